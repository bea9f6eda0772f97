"""Mosaic TPU kernels for the bare selective scan (y_t = C_t · x_t): forward, and a
backward that recomputes each chunk's states from the chunk-boundary states the forward
saved.

Grid (batch, channel tiles, time chunks); the chunk axis is sequential ("arbitrary") and
the state x [n, block_d] lives in VMEM scratch across it: state n on sublanes (padded to
8), channels on lanes (each group's channels padded to a multiple of the 128-wide tile,
so a tile never straddles two groups). Inside a chunk the time loop is sequential, in
fp32: rows of u, delta, dy are loaded and y, du, ddelta stored one aligned slab (8 rows,
16 for 16-bit inputs) at a time, and a step picks its row of a slab with a masked
sublane reduction. B and C come per chunk as [n, chunk] tiles (time on lanes); a step
picks its column with a masked lane reduction. Only aligned whole-tile loads and stores,
elementwise ops and reductions, so Mosaic needs no relayouts. Time is padded with
delta = u = 0, which leaves the state unchanged; the chunk is a multiple of the slab.

Residuals: the state at the start of every chunk, [b, t/chunk, n, d] in fp32. dA, dB and
dC come out as per-batch / per-channel-tile partial sums that the caller reduces.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels.selective_scan.common import backward_step, forward_step

LANES, SUBLANES = 128, 8
BLOCK_D = 256
DEFAULT_CHUNK = 64
F32 = jnp.float32


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
  """Zero-pad the given axes up to the given sizes."""
  widths = [(0, sizes.get(axis, dim) - dim) for axis, dim in enumerate(x.shape)]
  return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Padded sizes of one call: time [t_pad = chunks · chunk], states n_pad, and channels
  [groups · group_pad] in tiles of block_d (each group padded on its own, so that a tile
  never straddles two groups). Shared with the GPU kernels."""

  t: int
  d: int
  n: int
  groups: int
  chunk: int
  block_d: int
  n_pad: int

  @property
  def t_pad(self) -> int:
    return round_up(self.t, self.chunk)

  @property
  def num_chunks(self) -> int:
    return self.t_pad // self.chunk

  @property
  def group_pad(self) -> int:
    return round_up(self.d // self.groups, self.block_d)

  @property
  def tiles_per_group(self) -> int:
    return self.group_pad // self.block_d

  @property
  def tiles(self) -> int:
    return self.groups * self.tiles_per_group

  @property
  def width(self) -> int:
    return self.groups * self.group_pad


def _layout(u: jax.Array, n: int, groups: int, chunk: int) -> Layout:
  """Chunks of whole packed tiles (8 rows, 16 for 16-bit inputs); the widest channel
  tile (a multiple of 128, at most BLOCK_D) that divides a group padded to 128 lanes."""
  _, t, d = u.shape
  rows = SUBLANES * max(1, 4 // u.dtype.itemsize)
  group = round_up(d // groups, LANES)
  block_d = max(w for w in range(LANES, BLOCK_D + 1, LANES) if group % w == 0)
  return Layout(t, d, n, groups, round_up(min(chunk, t), rows), block_d, round_up(n, SUBLANES))


def to_channels(x: jax.Array, lay: Layout) -> jax.Array:
  """[b, t, d] -> [b, t_pad, groups · group_pad]."""
  b = x.shape[0]
  x = x.reshape(b, lay.t, lay.groups, lay.d // lay.groups)
  return pad(x, {1: lay.t_pad, 3: lay.group_pad}).reshape(b, lay.t_pad, lay.width)


def from_channels(x: jax.Array, lay: Layout) -> jax.Array:
  b = x.shape[0]
  x = x.reshape(b, lay.t_pad, lay.groups, lay.group_pad)[:, :lay.t, :, :lay.d // lay.groups]
  return x.reshape(b, lay.t, lay.d)


def to_states(x: jax.Array, lay: Layout) -> jax.Array:
  """[b, d, n] -> [b, n_pad, groups · group_pad] (state on sublanes, channels on lanes)."""
  b = x.shape[0]
  x = pad(x.reshape(b, lay.groups, lay.d // lay.groups, lay.n), {2: lay.group_pad, 3: lay.n_pad})
  return x.transpose(0, 3, 1, 2).reshape(b, lay.n_pad, lay.width)


def from_states(x: jax.Array, lay: Layout) -> jax.Array:
  b = x.shape[0]
  x = x.reshape(b, lay.n_pad, lay.groups, lay.group_pad)[:, :lay.n, :, :lay.d // lay.groups]
  return x.transpose(0, 2, 3, 1).reshape(b, lay.d, lay.n)


def _columns(x: jax.Array, lay: Layout) -> jax.Array:
  """B or C [b, t, g, n] -> [b, g, chunks, n_pad, chunk] (time on lanes)."""
  b = x.shape[0]
  x = pad(x, {1: lay.t_pad, 3: lay.n_pad}).reshape(b, lay.num_chunks, lay.chunk, lay.groups, lay.n_pad)
  return x.transpose(0, 3, 1, 4, 2)


def _uncolumns(x: jax.Array, lay: Layout) -> jax.Array:
  """Per-tile partial dB or dC [b, g · tiles, chunks, n_pad, chunk] -> [b, t, g, n]."""
  b = x.shape[0]
  x = x.reshape(b, lay.groups, lay.tiles_per_group, lay.num_chunks, lay.n_pad, lay.chunk).sum(2)
  x = x.transpose(0, 2, 4, 1, 3).reshape(b, lay.t_pad, lay.groups, lay.n_pad)
  return x[:, :lay.t, :, :lay.n]


def _column(m: jax.Array, lanes: jax.Array, s) -> jax.Array:
  """Column s of m [n, chunk] as [n, 1]."""
  return jnp.sum(jnp.where(lanes == s, m, 0.0), axis=1, keepdims=True)


def _row(slab: jax.Array, sublanes: jax.Array, r) -> jax.Array:
  """Row r of a [rows, d] slab as [1, d]."""
  return jnp.sum(jnp.where(sublanes == r, slab, 0.0), axis=0, keepdims=True)


def _slab(ref, m, rows: int) -> jax.Array:
  """Aligned rows [m · rows, (m + 1) · rows) of a [chunk, d] ref (one packed tile)."""
  return ref[pl.ds(pl.multiple_of(m * rows, rows), rows), :].astype(F32)


def _store_slab(ref, m, rows: int, value: jax.Array) -> None:
  ref[pl.ds(pl.multiple_of(m * rows, rows), rows), :] = value.astype(ref.dtype)


class _Tiles:
  """What every step of a chunk reads: A, the chunk's B and C columns, and iotas that
  pick a row of a slab or a column of [n, chunk]."""

  def __init__(self, a_ref, b_ref, c_ref, lay: Layout, dtype):
    self.A, self.b, self.c = a_ref[...], b_ref[...].astype(F32), c_ref[...].astype(F32)
    self.rows = SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)
    self.num_slabs = lay.chunk // self.rows
    self.lanes = jax.lax.broadcasted_iota(jnp.int32, self.b.shape, 1)
    self.sublanes = jax.lax.broadcasted_iota(jnp.int32, (self.rows, lay.block_d), 0)

  def columns(self, s):
    """B_s and C_s as [n, 1] columns."""
    return _column(self.b, self.lanes, s), _column(self.c, self.lanes, s)

  def row(self, slab, r):
    return _row(slab, self.sublanes, r)

  def put(self, slab, r, row):
    """The slab with row r replaced."""
    return jnp.where(self.sublanes == r, row, slab)


def _forward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, x0_ref, y_ref, bounds_ref, final_ref,
                    x_scratch, *, lay: Layout):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    x_scratch[...] = x0_ref[...]

  tiles = _Tiles(a_ref, b_ref, c_ref, lay, u_ref.dtype)
  rows = tiles.rows
  bounds_ref[...] = x_scratch[...]

  def slab(m, x):
    u, delta = _slab(u_ref, m, rows), _slab(delta_ref, m, rows)

    def step(r, carry):
      x, y_slab = carry
      x, y = forward_step(x, tiles.row(u, r), tiles.row(delta, r), tiles.A, *tiles.columns(m * rows + r))
      return x, tiles.put(y_slab, r, y)

    x, y_slab = jax.lax.fori_loop(0, rows, step, (x, jnp.zeros(u.shape, F32)))
    _store_slab(y_ref, m, rows, y_slab)
    return x

  x = jax.lax.fori_loop(0, tiles.num_slabs, slab, x_scratch[...])
  x_scratch[...] = x

  @pl.when(k == pl.num_programs(2) - 1)
  def _final():
    final_ref[...] = x


def _backward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, bounds_ref, dy_ref, dfinal_ref,
                     du_ref, ddelta_ref, da_ref, db_ref, dc_ref, dx0_ref, h_scratch, x_scratch, *,
                     lay: Layout):
  k = pl.program_id(2)  # the k-th chunk from the end

  @pl.when(k == 0)
  def _init():
    h_scratch[...] = dfinal_ref[...]
    da_ref[...] = jnp.zeros(da_ref.shape, F32)

  tiles = _Tiles(a_ref, b_ref, c_ref, lay, u_ref.dtype)
  rows, A = tiles.rows, tiles.A

  def recompute(m, x):  # the chunk's states from its boundary state, into x_scratch
    u, delta = _slab(u_ref, m, rows), _slab(delta_ref, m, rows)

    def step(r, x):
      x_scratch[m * rows + r] = x
      return forward_step(x, tiles.row(u, r), tiles.row(delta, r), A, *tiles.columns(m * rows + r))[0]

    return jax.lax.fori_loop(0, rows, step, x)

  jax.lax.fori_loop(0, tiles.num_slabs, recompute, bounds_ref[...])

  def adjoint_slab(i, carry):
    m = tiles.num_slabs - 1 - i
    u, delta, dy = _slab(u_ref, m, rows), _slab(delta_ref, m, rows), _slab(dy_ref, m, rows)

    def step(j, carry):
      h, da, db_all, dc_all, du_slab, ddelta_slab = carry
      r = rows - 1 - j
      s = m * rows + r
      h, du, ddelta, da_s, db, dc = backward_step(
          h, x_scratch[s], tiles.row(dy, r), tiles.row(u, r), tiles.row(delta, r), A, *tiles.columns(s))
      return (h, da + da_s, jnp.where(tiles.lanes == s, db, db_all),
              jnp.where(tiles.lanes == s, dc, dc_all), tiles.put(du_slab, r, du),
              tiles.put(ddelta_slab, r, ddelta))

    zeros = jnp.zeros(u.shape, F32)
    h, da, db_all, dc_all, du_slab, ddelta_slab = jax.lax.fori_loop(0, rows, step, (*carry, zeros, zeros))
    _store_slab(du_ref, m, rows, du_slab)
    _store_slab(ddelta_ref, m, rows, ddelta_slab)
    return h, da, db_all, dc_all

  zeros_cols = jnp.zeros(tiles.b.shape, F32)
  h, da, db_all, dc_all = jax.lax.fori_loop(
      0, tiles.num_slabs, adjoint_slab, (h_scratch[...], jnp.zeros(A.shape, F32), zeros_cols, zeros_cols))
  h_scratch[...] = h
  da_ref[...] += da
  db_ref[...] = db_all
  dc_ref[...] = dc_all

  @pl.when(k == pl.num_programs(2) - 1)
  def _initial():
    dx0_ref[...] = h


def _specs(lay: Layout, reverse: bool) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over the grid (batch i, channel tile j, chunk step k); ``reverse`` walks
  the chunks from the last."""
  chunk_of = (lambda k: lay.num_chunks - 1 - k) if reverse else (lambda k: k)
  group_of = lambda j: jax.lax.div(j, lay.tiles_per_group)  # noqa: E731
  bd, n_pad = lay.block_d, lay.n_pad
  return {
      "rows": pl.BlockSpec((None, lay.chunk, bd), lambda i, j, k: (i, chunk_of(k), j)),
      "a": pl.BlockSpec((n_pad, bd), lambda i, j, k: (0, j)),
      "cols": pl.BlockSpec((None, None, None, n_pad, lay.chunk),
                           lambda i, j, k: (i, group_of(j), chunk_of(k), 0, 0)),
      "tile_cols": pl.BlockSpec((None, None, None, n_pad, lay.chunk),
                                lambda i, j, k: (i, j, chunk_of(k), 0, 0)),
      "state": pl.BlockSpec((None, n_pad, bd), lambda i, j, k: (i, 0, j)),
      "bounds": pl.BlockSpec((None, None, n_pad, bd), lambda i, j, k: (i, chunk_of(k), 0, j)),
  }


def _grid(lay: Layout, b: int) -> tuple[int, int, int]:
  return b, lay.tiles, lay.num_chunks


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
            B: Float[Array, "b t g n"], C: Float[Array, "b t g n"], x0: Float[Array, "b d n"],
            chunk: int, interpret):
  """u, delta [b, t, d]; A [d, n]; B, C [b, t, g, n]; x0 [b, d, n] fp32. Returns y [b, t, d]
  in u's dtype, the final state [b, d, n] and the residual chunk-boundary states."""
  b = u.shape[0]
  lay = _layout(u, A.shape[1], B.shape[2], chunk)
  specs = _specs(lay, reverse=False)
  state_shape = jax.ShapeDtypeStruct((b, lay.n_pad, lay.width), F32)
  y, bounds, final = pl.pallas_call(
      functools.partial(_forward_kernel, lay=lay),
      grid=_grid(lay, b),
      in_specs=[specs["rows"], specs["rows"], specs["a"], specs["cols"], specs["cols"], specs["state"]],
      out_specs=[specs["rows"], specs["bounds"], specs["state"]],
      out_shape=[jax.ShapeDtypeStruct((b, lay.t_pad, lay.width), u.dtype),
                 jax.ShapeDtypeStruct((b, lay.num_chunks, lay.n_pad, lay.width), F32), state_shape],
      scratch_shapes=[pltpu.VMEM((lay.n_pad, lay.block_d), F32)],
      compiler_params=_params(), interpret=interpret, name="selective_scan_fwd",
  )(to_channels(u, lay), to_channels(delta, lay), to_states(A.astype(F32)[None], lay)[0],
    _columns(B, lay), _columns(C, lay), to_states(x0, lay))
  return from_channels(y, lay), from_states(final, lay), bounds


def backward(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
             B: Float[Array, "b t g n"], C: Float[Array, "b t g n"], bounds: jax.Array,
             dy: Float[Array, "b t d"], dfinal: Float[Array, "b d n"], chunk: int, interpret):
  """Gradients of `forward`'s (y, final state): du, ddelta, dA, dB, dC (per group, as B)
  and dx0, all fp32."""
  b = u.shape[0]
  lay = _layout(u, A.shape[1], B.shape[2], chunk)
  specs = _specs(lay, reverse=True)
  tiles = lay.tiles
  rows_shape = jax.ShapeDtypeStruct((b, lay.t_pad, lay.width), F32)
  state_shape = jax.ShapeDtypeStruct((b, lay.n_pad, lay.width), F32)
  cols_shape = jax.ShapeDtypeStruct((b, tiles, lay.num_chunks, lay.n_pad, lay.chunk), F32)
  du, ddelta, da, db, dc, dx0 = pl.pallas_call(
      functools.partial(_backward_kernel, lay=lay),
      grid=_grid(lay, b),
      in_specs=[specs["rows"], specs["rows"], specs["a"], specs["cols"], specs["cols"],
                specs["bounds"], specs["rows"], specs["state"]],
      out_specs=[specs["rows"], specs["rows"], specs["state"], specs["tile_cols"],
                 specs["tile_cols"], specs["state"]],
      out_shape=[rows_shape, rows_shape, state_shape, cols_shape, cols_shape, state_shape],
      scratch_shapes=[pltpu.VMEM((lay.n_pad, lay.block_d), F32),
                      pltpu.VMEM((lay.chunk, lay.n_pad, lay.block_d), F32)],
      compiler_params=_params(), interpret=interpret, name="selective_scan_bwd",
  )(to_channels(u, lay), to_channels(delta, lay), to_states(A.astype(F32)[None], lay)[0],
    _columns(B, lay), _columns(C, lay), bounds, to_channels(dy, lay), to_states(dfinal, lay))
  dA = from_states(da, lay).sum(0)
  return (from_channels(du, lay), from_channels(ddelta, lay), dA, _uncolumns(db, lay),
          _uncolumns(dc, lay), from_states(dx0, lay))
