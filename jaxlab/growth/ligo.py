"""LiGO: learning to grow pretrained models (Wang et al., ICLR 2023), as the official
``ligo.py`` parameterizes it.

Each large parameter is a learned linear map of the small model's: depth first, then
width. Depth: large layer i's tensor is Σ_l w[l] W_l over the small layers of the same
kind, with one coefficient vector per tensor of every large layer (weights and biases of
each module have their own, as the official ``FusedDepthParams``). Width: every axis of
units is multiplied by B = [I; C], the old units kept and each new unit a learned
combination of the old ones (``FusedWidthParams``), on the reading and the writing side
alike, without Net2Net's division. The residual stream has one C for the whole model
(the official ``g_e``, shared by embeddings, every layer's norms, inputs and outputs);
each large layer has its own C per space (heads, key-value heads, MLP neurons, experts,
SSM channels). Deviations: heads are units (C mixes whole heads, the head width kept, so
RoPE's pairs stay intact; the official code mixes BERT's flat Q/K/V dimensions), and the
query, key and value maps of a layer are one per space (query heads, key-value heads)
where the official code has separate Q, K and V maps.

Initialization (``--fuse_init_scheme stackbert_noisy rand``): depth w = U(0, 0.03) with a
1 at the stacking source (i mod L1), normalized to sum 1; width rows of C ~ U[0, 1)
normalized to sum 1. ``depth_init="stack", width_init="copy"`` is one-hot: the grown
model is then exactly `grow(..., "stack", width="copy")` with the same mapping and seed.
After training the operator (`jaxlab.train.grow`), `LiGO.apply` materializes a plain
large model that trains like any other. ``kronecker=k`` factorizes each width map into a
Kronecker product (`LiGO.init`), for models whose C would be large.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.growth import spaces
from jaxlab.growth.depth import block_type, layer_sources
from jaxlab.growth.trees import abstract_params, by_name, rebuild
from jaxlab.growth.width import WidthPlan, mix_units
from jaxlab.nn import ModelConfig

DEPTH_INITS = ("stackbert_noisy", "stack", "interleave")
WIDTH_INITS = ("rand", "sel_noisy", "copy")
NOISE = 0.03  # the official U(0, 0.03) init noise


class LiGO:
  """The operator from ``config`` to ``target``: `init` its parameters, `apply` them."""

  def __init__(self, config: ModelConfig, target: ModelConfig, *, mapping: str = "random", seed: int = 0,
               kronecker: int | None = None):
    self.config, self.target, self.kronecker = config, target, kronecker
    self.plan = WidthPlan(config, target, mapping, seed)
    self.seed = seed
    self.candidates = [[l for l in range(config.num_layers) if block_type(config, l) == block_type(target, i)]
                       for i in range(target.num_layers)]
    self.template = abstract_params(target)
    self.names = list(by_name(self.template))
    self.width_spaces = sorted({(self._layer(name), units.space) for name in self.names
                          for units in self._units(name) if self.plan.maps(self._layer(name))(units.space)},
                         key=str)

  @staticmethod
  def _layer(name: str) -> int | None:
    match = spaces.LAYER.fullmatch(name)
    return None if match is None else int(match.group(1))

  def _units(self, name: str) -> list[spaces.Units]:
    parts = []
    for axis in spaces.rule(self.target, name).axes:
      parts += [p for p in (axis if isinstance(axis, tuple) else (axis,)) if isinstance(p, spaces.Units)]
    return parts

  @staticmethod
  def _width_key(layer: int | None, space: str) -> str:
    return f"width/{space}" if space in spaces.GLOBAL_SPACES else f"width/{layer}/{space}"

  def _factored(self, new: int, old: int) -> bool:
    """Whether a [new, old] C is stored as outer ⊗ inner, inner [k, k] (``kronecker=k``)."""
    return self.kronecker is not None and new % self.kronecker == 0 and old % self.kronecker == 0

  def init(self, depth_init: str = "stackbert_noisy", width_init: str = "rand") -> dict[str, jax.Array]:
    """The operator's parameters: ``depth/<large tensor>`` [small layers of its kind] and
    ``width/[<layer>/]<space>`` C [new units, old units]. With ``kronecker=k``, every C
    whose sizes k divides is C_outer ⊗ C_inner (``.../outer`` [new/k, old/k], ``.../inner``
    [k, k], both rows convex as ``rand``): (new·old)/k² + k² parameters instead of new·old."""
    if depth_init not in DEPTH_INITS or width_init not in WIDTH_INITS:
      raise ValueError(f"depth_init={depth_init!r}, width_init={width_init!r}: choose from {DEPTH_INITS} "
                       f"and {WIDTH_INITS}")
    if self.kronecker is not None and width_init != "rand":
      raise ValueError(f"Kronecker-factorized widths start from width_init='rand' (got {width_init!r})")
    rng = np.random.default_rng(self.seed + 1)
    sources = layer_sources(self.config, self.target, "interleave" if depth_init == "interleave" else "stack")
    params = {}
    for name in self.names:
      layer = self._layer(name)
      if layer is None:
        continue
      cands = self.candidates[layer]
      w = rng.uniform(0, NOISE, len(cands)) if depth_init == "stackbert_noisy" else np.zeros(len(cands))
      w[cands.index(sources[layer][0])] = 1.0
      params[f"depth/{name}"] = jnp.asarray(w / w.sum(), jnp.float32)
    for layer, space in self.width_spaces:
      key = self._width_key(layer, space)
      if key in params or f"{key}/outer" in params:
        continue
      unit_map = self.plan.maps(layer)(space)
      new, n = int(unit_map.new.sum()), unit_map.source_size
      if self._factored(new, n):
        k = self.kronecker
        for part, shape in (("outer", (new // k, n // k)), ("inner", (k, k))):
          rows = rng.uniform(0, 1, shape)
          params[f"{key}/{part}"] = jnp.asarray(rows / rows.sum(axis=1, keepdims=True), jnp.float32)
        continue
      if width_init == "rand":
        rows = rng.uniform(0, 1, (new, n))
      else:
        rows = np.eye(n)[unit_map.index[unit_map.new]]
        if width_init == "sel_noisy":
          rows = rows + rng.uniform(0, NOISE, (new, n))
      params[key] = jnp.asarray(rows / rows.sum(axis=1, keepdims=True), jnp.float32)
    return params

  def apply(self, operator_params: dict[str, jax.Array], params: nnx.State) -> nnx.State:
    """The large model's parameters from the small model's ``params`` (differentiable in
    ``operator_params``; works under ``jax.jit`` with the large model's shardings)."""
    small = by_name(params)

    def value(name: str, like: jax.ShapeDtypeStruct) -> jax.Array:
      layer = self._layer(name)
      if layer is None:
        x = small[name]
      else:
        rest = spaces.LAYER.fullmatch(name).group(2)
        stacked = jnp.stack([small[f"blocks/{l}/{rest}"] for l in self.candidates[layer]])
        x = jnp.tensordot(operator_params[f"depth/{name}"].astype(stacked.dtype), stacked, 1,
                          precision=jax.lax.Precision.HIGHEST)

      def matrix(space):
        unit_map = self.plan.maps(layer)(space)
        if unit_map is None:
          return None
        key = self._width_key(layer, space)
        rows = operator_params[key] if key in operator_params else jnp.kron(
            operator_params[f"{key}/outer"], operator_params[f"{key}/inner"])
        return unit_map.matrix(rows)

      return mix_units(x, spaces.rule(self.target, name).axes, matrix).astype(like.dtype)

    return rebuild(self.template, value)
