"""Width maps: where each unit of a wider space comes from, and applying them to a tensor.

A ``UnitMap`` of a space that grows from n to q units sends unit j of the wide space to
unit ``index[j]`` of the narrow one. Net2Net's widening (Chen et al., ICLR 2016, §3.1)
copies a unit's incoming weights (axes with role ``"out"``) and divides its outgoing ones
(role ``"in"``) by the unit's copy count |{x : g(x) = g(j)}|; then every consumer sees the
sum it saw before, and the wider network computes the same function wherever units are
only summed. ``copy`` skips the division (the width part of the stacking baseline, and
what LiGO's ``B = [I; C]`` is at a one-hot ``C``).

Exactness (Net2Net and bert2BERT's FPI): heads (with their head width kept), MLP and
expert neurons, SSM channels, heads and step-size rank are exact, since each is read by
a linear map. A widened residual stream is exact except where it is normalized: the copied
stream Ph has mean square (1/q) Σ_i c_i h_i², where c_i is unit i's copy count, so
RMSNorm's output is ρ·P·norm(h) with ρ = rms(h)/rms(Ph) in [sqrt(q/(n c_max)),
sqrt(q/(n c_min))]. When every unit has the same count (q a multiple of n and
``mapping="cyclic"``) ρ = 1 and RMSNorm and LayerNorm are exact, ε included; a random
mapping leaves ρ ≠ 1 per token. Mamba-2's gated RMSNorm over its widened inner width
behaves the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.growth.spaces import LAYER_SPACES, Axis, Units, space_size
from jaxlab.nn import ModelConfig

MAPPINGS = ("random", "cyclic")


@dataclasses.dataclass(frozen=True)
class UnitMap:
  """Unit j of the wide space comes from unit ``index[j]`` of the narrow one; ``new[j]``
  marks the units the narrow space did not have (the others are the units themselves)."""

  index: np.ndarray
  new: np.ndarray
  source_size: int

  @property
  def counts(self) -> np.ndarray:
    """How many wide units copy each narrow unit."""
    return np.bincount(self.index, minlength=self.source_size)

  @classmethod
  def draw(cls, n: int, q: int, mapping: str, rng: np.random.Generator) -> "UnitMap":
    """Net2Net's g: g(j) = j for j < n; for the q - n new units uniform over the n old
    ones (``random``) or j mod n (``cyclic``, equal counts when n divides q)."""
    if q < n:
      raise ValueError(f"growth cannot shrink a space from {n} to {q} units")
    extra = rng.integers(0, n, q - n) if mapping == "random" else np.arange(n, q) % n
    return cls(np.concatenate([np.arange(n), extra]), np.arange(q) >= n, n)

  @classmethod
  def identity(cls, n: int) -> "UnitMap":
    return cls(np.arange(n), np.zeros(n, bool), n)

  @classmethod
  def product(cls, outer: "UnitMap", inner: "UnitMap") -> "UnitMap":
    """The map of units laid out as [outer, inner] (query heads grouped by key-value
    head): unit (a, b) comes from (outer.index[a], inner.index[b])."""
    index = outer.index[:, None] * inner.source_size + inner.index[None, :]
    new = outer.new[:, None] | inner.new[None, :]
    return cls(index.reshape(-1), new.reshape(-1), outer.source_size * inner.source_size)

  def matrix(self, rows: jax.Array) -> jax.Array:
    """LiGO's [q, n] B: the old units' rows one-hot, the new units' rows ``rows`` [q - n, n]."""
    eye = jax.nn.one_hot(self.index, self.source_size, dtype=jnp.float32)
    return eye.at[np.flatnonzero(self.new)].set(rows)


class WidthPlan:
  """The UnitMap of every space that grows from ``config`` to ``target``: the residual
  stream's (one for the model) and each target layer's. Query heads are laid out by
  key-value head, so their map is the product of the key-value heads' map and the map of
  query heads within a group (GQA groups stay consistent). With TAPE every layer shares
  one heads map, since its position features flow from layer to layer per head."""

  def __init__(self, config: ModelConfig, target: ModelConfig, mapping: str, seed: int):
    if mapping not in MAPPINGS:
      raise ValueError(f"mapping={mapping!r}: choose one of {MAPPINGS}")
    rng = np.random.default_rng(seed)

    def draw(space):
      n, q = space_size(config, space), space_size(target, space)
      return None if n == q else UnitMap.draw(n, q, mapping, rng)

    self.embed = draw("embed")
    # TAPE's position features are a per-head stream through all layers: one heads map.
    shared = {space: draw(space) for space in ("kv_heads", "group")} if target.positional == "tape" else {}
    self.layers = []
    for _ in range(target.num_layers):
      maps = {space: shared[space] if space in shared else draw(space)
              for space in LAYER_SPACES if space != "heads"}
      if maps["kv_heads"] or maps["group"]:
        maps["heads"] = UnitMap.product(maps["kv_heads"] or UnitMap.identity(config.kv_heads),
                                        maps["group"] or UnitMap.identity(space_size(config, "group")))
      self.layers.append(maps)

  def maps(self, layer: int | None):
    """``space -> UnitMap | None`` for target layer ``layer`` (None: outside the blocks)."""
    return lambda space: self.embed if space == "embed" else None if layer is None else self.layers[layer].get(space)


def segments(axis: Axis, length: int) -> list[tuple[Units | None, int]]:
  """The parts of an axis of ``length`` elements: (units or None, narrow length)."""
  if axis is None:
    return [(None, length)]
  parts = axis if isinstance(axis, tuple) else (axis,)
  fixed = sum(p for p in parts if isinstance(p, int))
  units = [p for p in parts if isinstance(p, Units)]
  if len(units) != 1:
    raise ValueError(f"an axis packs exactly one run of units, got {axis}")
  return [(p, length - fixed) if isinstance(p, Units) else (None, p) for p in parts]


def along_units(x: jax.Array, axes: tuple[Axis, ...], transform) -> jax.Array:
  """``x`` with ``transform(part, axis, units)`` applied to each run of units, where
  ``part`` has that axis split into [units, unit size] at position ``axis``."""
  for axis, spec in enumerate(axes):
    if spec is None:
      continue
    pieces, start = [], 0
    for units, length in segments(spec, x.shape[axis]):
      piece = jax.lax.slice_in_dim(x, start, start + length, axis=axis)
      start += length
      if units is not None:
        split = piece.reshape(*piece.shape[:axis], length // units.size, units.size, *piece.shape[axis + 1:])
        split = transform(split, axis, units)
        piece = split.reshape(*split.shape[:axis], -1, *split.shape[axis + 2:])
      pieces.append(piece)
    x = jnp.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0]
  return x


def _along(axis: int, ndim: int) -> tuple[int, ...]:
  """The shape that lays a vector along ``axis`` of an ``ndim``-d array."""
  return (1,) * axis + (-1,) + (1,) * (ndim - axis - 1)


def copy_units(x: jax.Array, axes: tuple[Axis, ...], maps, *, divide: bool) -> jax.Array:
  """Net2Net's widening of ``x`` (``divide=False``: plain copies). ``maps(space)`` is the
  space's UnitMap, or None where it keeps its size."""

  def transform(part, axis, units):
    unit_map = maps(units.space)
    if unit_map is None:
      return part
    out = jnp.take(part, unit_map.index, axis=axis)
    if divide and units.role == "in":
      scale = (1.0 / unit_map.counts[unit_map.index]).astype(np.float32)
      out = out * jnp.asarray(scale, out.dtype).reshape(_along(axis, out.ndim))
    return out

  return along_units(x, axes, transform)


def new_unit_mask(shape_like: jax.Array, axes: tuple[Axis, ...], maps, spaces) -> jax.Array:
  """True where an element belongs to a new unit of one of ``spaces``."""

  def transform(part, axis, units):
    unit_map = maps(units.space)
    if unit_map is None:
      return part
    part = jnp.take(part, unit_map.index, axis=axis)
    if units.space not in spaces:
      return part
    return part | jnp.asarray(unit_map.new).reshape(_along(axis, part.ndim))

  return along_units(jnp.zeros(shape_like.shape, bool), axes, transform)


def mix_units(x: jax.Array, axes: tuple[Axis, ...], matrices) -> jax.Array:
  """LiGO's width expansion: every axis of units multiplied by its space's [q, n]
  matrix B (``matrices(space)``, None where the space keeps its size), on both the
  reading and the writing side, without Net2Net's division (the official ``ligo.py``)."""

  def transform(part, axis, units):
    matrix = matrices(units.space)
    if matrix is None:
      return part
    moved = jnp.moveaxis(part, axis, -1)
    return jnp.moveaxis(jnp.einsum("...n,qn->...q", moved, matrix.astype(part.dtype),
                                   precision=jax.lax.Precision.HIGHEST), -1, axis)

  return along_units(x, axes, transform)
