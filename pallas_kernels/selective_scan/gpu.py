"""Pallas GPU kernels (Triton lowering) for the bare selective scan (y_t = C_t · x_t):
forward, and a backward that recomputes each chunk's states from the chunk-boundary
states the forward saved.

Grid (batch, channel tiles): a program owns the state x [n, block_d] of one tile and
walks time itself, chunk by chunk (GPU programs cannot carry state across a grid axis).
Rows (u, delta, dy: [1, block_d]) and columns (B, C: [n, 1]; B and C come as
[b, g, n, t], time last) are loaded one time step at a time. The backward walks the
chunks in reverse; inside a chunk the steps are unrolled so that the recomputed states
stay in registers. Block sizes are powers of two; channels and states are zero-padded
(with the TPU kernels' layout helpers), time is padded with delta = u = 0.

Residuals: the state at the start of every chunk, [b, t/chunk, n, d] in fp32. dA, dB and
dC come out as per-batch / per-channel-tile partial sums that the caller reduces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from pallas_kernels.selective_scan.common import backward_step, forward_step
from pallas_kernels.selective_scan.tpu import (
    Layout, from_channels, from_states, pad, to_channels, to_states,
)

BLOCK_D = 32
DEFAULT_CHUNK = 16
NUM_WARPS = 4
F32 = jnp.float32


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _layout(u: jax.Array, n: int, groups: int, chunk: int) -> Layout:
  _, t, d = u.shape
  block_d = min(BLOCK_D, max(16, _pow2(d // groups)))
  return Layout(t, d, n, groups, min(chunk, t), block_d, max(16, _pow2(n)))


def _time_last(x: jax.Array, lay: Layout) -> jax.Array:
  """B or C [b, t, g, n] -> [b, g, n_pad, t_pad]."""
  return pad(x, {1: lay.t_pad, 3: lay.n_pad}).transpose(0, 2, 3, 1)


def _from_time_last(x: jax.Array, lay: Layout) -> jax.Array:
  """Per-tile partial dB or dC [b, g · tiles, n_pad, t_pad] -> [b, t, g, n]."""
  b = x.shape[0]
  x = x.reshape(b, lay.groups, lay.tiles_per_group, lay.n_pad, lay.t_pad).sum(2)
  return x.transpose(0, 3, 1, 2)[:, :lay.t, :, :lay.n]


def _row(ref, t):
  return ref[pl.ds(t, 1), :].astype(F32)


def _col(ref, t):
  return ref[:, pl.ds(t, 1)].astype(F32)


def _forward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, x0_ref, y_ref, bounds_ref, final_ref, *,
                    lay: Layout):
  A = a_ref[...]

  def step(t, x):
    x, y = forward_step(x, _row(u_ref, t), _row(delta_ref, t), A, _col(b_ref, t), _col(c_ref, t))
    y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
    return x

  def chunk(k, x):
    bounds_ref[k] = x
    start = k * lay.chunk
    return jax.lax.fori_loop(start, start + lay.chunk, step, x)

  final_ref[...] = jax.lax.fori_loop(0, lay.num_chunks, chunk, x0_ref[...])


def _backward_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, bounds_ref, dy_ref, dfinal_ref,
                     du_ref, ddelta_ref, da_ref, db_ref, dc_ref, dx0_ref, *, lay: Layout):
  A = a_ref[...]

  def inputs(t):
    return _row(u_ref, t), _row(delta_ref, t), A, _col(b_ref, t), _col(c_ref, t)

  def chunk(i, carry):
    h, da = carry
    k = lay.num_chunks - 1 - i
    states = [bounds_ref[k]]
    for s in range(lay.chunk - 1):  # recompute the chunk's states, kept in registers
      states.append(forward_step(states[-1], *inputs(k * lay.chunk + s))[0])
    for s in reversed(range(lay.chunk)):  # the inputs are read again: fewer live registers
      t = k * lay.chunk + s
      h, du, ddelta, da_s, db, dc = backward_step(h, states[s], _row(dy_ref, t), *inputs(t))
      du_ref[pl.ds(t, 1), :] = du
      ddelta_ref[pl.ds(t, 1), :] = ddelta
      db_ref[:, pl.ds(t, 1)] = db
      dc_ref[:, pl.ds(t, 1)] = dc
      da = da + da_s
    return h, da

  h, da = jax.lax.fori_loop(0, lay.num_chunks, chunk, (dfinal_ref[...], jnp.zeros(A.shape, F32)))
  da_ref[...] = da
  dx0_ref[...] = h


def _specs(lay: Layout) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over the grid (batch i, channel tile j)."""
  group_of = lambda j: jax.lax.div(j, lay.tiles_per_group)  # noqa: E731
  bd, n_pad = lay.block_d, lay.n_pad
  return {
      "rows": pl.BlockSpec((None, lay.t_pad, bd), lambda i, j: (i, 0, j)),
      "a": pl.BlockSpec((n_pad, bd), lambda i, j: (0, j)),
      "cols": pl.BlockSpec((None, None, n_pad, lay.t_pad), lambda i, j: (i, group_of(j), 0, 0)),
      "tile_cols": pl.BlockSpec((None, None, n_pad, lay.t_pad), lambda i, j: (i, j, 0, 0)),
      "state": pl.BlockSpec((None, n_pad, bd), lambda i, j: (i, 0, j)),
      "bounds": pl.BlockSpec((None, lay.num_chunks, n_pad, bd), lambda i, j: (i, 0, 0, j)),
  }


def _call(kernel, lay: Layout, b: int, in_specs, out_specs, out_shape, interpret, name):
  return pl.pallas_call(
      functools.partial(kernel, lay=lay), grid=(b, lay.tiles), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name=name,
  )


def forward(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
            B: Float[Array, "b t g n"], C: Float[Array, "b t g n"], x0: Float[Array, "b d n"],
            chunk: int, interpret):
  """u, delta [b, t, d]; A [d, n]; B, C [b, t, g, n]; x0 [b, d, n] fp32. Returns y [b, t, d]
  in u's dtype, the final state [b, d, n] and the residual chunk-boundary states."""
  b = u.shape[0]
  lay = _layout(u, A.shape[1], B.shape[2], chunk)
  specs = _specs(lay)
  state_shape = jax.ShapeDtypeStruct((b, lay.n_pad, lay.width), F32)
  y, bounds, final = _call(
      _forward_kernel, lay, b,
      [specs["rows"], specs["rows"], specs["a"], specs["cols"], specs["cols"], specs["state"]],
      [specs["rows"], specs["bounds"], specs["state"]],
      [jax.ShapeDtypeStruct((b, lay.t_pad, lay.width), u.dtype),
       jax.ShapeDtypeStruct((b, lay.num_chunks, lay.n_pad, lay.width), F32), state_shape],
      interpret, "selective_scan_fwd",
  )(to_channels(u, lay), to_channels(delta, lay), to_states(A.astype(F32)[None], lay)[0],
    _time_last(B, lay), _time_last(C, lay), to_states(x0, lay))
  return from_channels(y, lay), from_states(final, lay), bounds


def backward(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
             B: Float[Array, "b t g n"], C: Float[Array, "b t g n"], bounds: jax.Array,
             dy: Float[Array, "b t d"], dfinal: Float[Array, "b d n"], chunk: int, interpret):
  """Gradients of `forward`'s (y, final state): du, ddelta, dA, dB, dC (per group, as B)
  and dx0, all fp32."""
  b = u.shape[0]
  lay = _layout(u, A.shape[1], B.shape[2], chunk)
  specs = _specs(lay)
  rows_shape = jax.ShapeDtypeStruct((b, lay.t_pad, lay.width), F32)
  state_shape = jax.ShapeDtypeStruct((b, lay.n_pad, lay.width), F32)
  cols_shape = jax.ShapeDtypeStruct((b, lay.tiles, lay.n_pad, lay.t_pad), F32)
  du, ddelta, da, db, dc, dx0 = _call(
      _backward_kernel, lay, b,
      [specs["rows"], specs["rows"], specs["a"], specs["cols"], specs["cols"], specs["bounds"],
       specs["rows"], specs["state"]],
      [specs["rows"], specs["rows"], specs["state"], specs["tile_cols"], specs["tile_cols"],
       specs["state"]],
      [rows_shape, rows_shape, state_shape, cols_shape, cols_shape, state_shape],
      interpret, "selective_scan_bwd",
  )(to_channels(u, lay), to_channels(delta, lay), to_states(A.astype(F32)[None], lay)[0],
    _time_last(B, lay), _time_last(C, lay), bounds, to_channels(dy, lay), to_states(dfinal, lay))
  dA = from_states(da, lay).sum(0)
  return (from_channels(du, lay), from_channels(ddelta, lay), dA, _from_time_last(db, lay),
          _from_time_last(dc, lay), from_states(dx0, lay))
