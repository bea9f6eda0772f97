"""Logical axis names and the one table that maps them onto mesh axes.

Every parameter and every constrained activation names its dimensions with the
vocabulary below. A *strategy* is an ordered list of ``(logical name, mesh axes)``
rules, resolved per tensor as MaxText and Flax do: rules are walked in order and a
rule assigns its mesh axes to the dimensions with that logical name only if none of
those mesh axes is already used by the tensor. Later rules for the same name are
fallbacks. So ``batch`` (listed first) takes ``fsdp`` on activations, while ``embed``
takes ``fsdp`` on parameters, which have no batch dimension.

Logical names:
  batch     examples in a batch                 length    sequence positions
  embed     model width (d_model)               vocab     vocabulary entries
  heads     query heads                         kv_heads  key/value heads
  head_dim  per-head features                   mlp       feed-forward hidden width
  expert    experts of a mixture                state     recurrent state features
  conv      convolution taps                    layers    stacked layers
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

LOGICAL_AXES = (
    "batch", "length", "embed", "vocab", "heads", "kv_heads",
    "head_dim", "mlp", "expert", "state", "conv", "layers",
)
MESH_AXES = ("data", "fsdp", "tensor", "expert")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("batch", ("data", "fsdp", "expert"))

_TENSOR = (
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
)

STRATEGIES: dict[str, Rules] = {
    # Parameters replicated; the batch is split over every mesh axis.
    "dp": (_BATCH,),
    # Parameters split along their model width over `fsdp` (ZeRO-3 style).
    "fsdp": (_BATCH, ("embed", ("fsdp",))),
    # FSDP plus Megatron tensor parallelism over `tensor`.
    "fsdp_tp": (_BATCH, *_TENSOR, ("embed", ("fsdp",))),
    # FSDP with the experts of MoE layers split over `expert` (expert parallelism:
    # tokens travel to their experts with all_to_all); the batch still spans `expert`.
    "fsdp_ep": (_BATCH, ("expert", ("expert",)), ("embed", ("fsdp",))),
    "fsdp_tp_ep": (_BATCH, ("expert", ("expert",)), *_TENSOR, ("embed", ("fsdp",))),
}
EXPERT_PARALLEL = ("fsdp_ep", "fsdp_tp_ep")


def strategy_rules(strategy: str) -> Rules:
  """The rules of a named strategy."""
  if strategy not in STRATEGIES:
    raise ValueError(
        f"sharding.strategy={strategy!r} is not a known strategy; "
        f"use one of {sorted(STRATEGIES)}."
    )
  return STRATEGIES[strategy]


def used_mesh_axes(rules: Rules) -> set[str]:
  """Mesh axes that at least one rule can assign."""
  return {axis for _, axes in rules for axis in axes}


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Resolves a tuple of logical dimension names to a PartitionSpec."""
  for name in names:
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"unknown logical axis {name!r}; the vocabulary is {LOGICAL_AXES}")
  assigned: list[tuple[str, ...] | None] = [None] * len(names)
  taken: set[str] = set()
  for logical, mesh_axes in rules:
    for dim, name in enumerate(names):
      if name == logical and assigned[dim] is None and taken.isdisjoint(mesh_axes):
        assigned[dim] = mesh_axes
        taken.update(mesh_axes)
  return PartitionSpec(*(a if a is None or len(a) > 1 else a[0] for a in assigned))


def spec_size(spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
  """How many shards each dimension of ``spec`` is split into on a mesh."""
  sizes = []
  for entry in spec:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    size = 1
    for axis in axes:
      size *= mesh_shape[axis]
    sizes.append(size)
  return tuple(sizes)
