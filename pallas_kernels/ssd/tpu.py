"""Mosaic TPU kernels for SSD: the forward and the backward, one grid each.

Grid ``(b, h, chunks)``, the chunk axis sequential (``arbitrary``) with the state
[p, n] in fp32 VMEM scratch; the per-chunk math is `xla.chunk_forward` /
`xla.chunk_backward` (matmuls for the intra- and inter-chunk terms). The forward saves
the state at the start of every chunk; the backward walks the chunks in reverse with
d(state) in scratch and recomputes each chunk from its saved state.

Layout inside: ``[b, h, t, ·]`` so a block's last two dims are (chunk, feature), with
the feature dims (p, n) taken whole; per-step scalars (dt, Λ) come as [t, 1] columns
and Λ once more as [1, L] rows per chunk (the decay mask needs both orientations).
The chunk is a multiple of 8 (sublanes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd.xla import F32, chunk_backward, chunk_forward, chunk_log_decay, pad_time, round_up

SUBLANES = 8


def chunk_length(chunk_size: int, t: int) -> int:
  """The kernel's chunk: chunk_size (no longer than needed), rounded up to 8."""
  return round_up(min(chunk_size, t), SUBLANES)


def _heads_major(v: jax.Array) -> jax.Array:
  """[b, t, h, ...] -> [b, h, t, ...]."""
  return jnp.swapaxes(v, 1, 2)


def _columns(v: jax.Array) -> jax.Array:
  """Per-step scalars [b, t, h] as [b, h, t, 1] fp32."""
  return _heads_major(v.astype(F32))[..., None]


def _rows(lam: jax.Array, size: int) -> jax.Array:
  """Λ [b, t, h] as [b, h, chunks, 1, L]."""
  b, t, h = lam.shape
  return _heads_major(lam).reshape(b, h, t // size, 1, size)


def _specs(size: int, p: int, n: int, group: int, nc: int, reverse: bool):
  """BlockSpecs over the grid (b, h, c); ``reverse`` walks the chunks last to first."""
  chunk = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  steps = lambda w: pl.BlockSpec((None, None, size, w), lambda b, h, c: (b, h, chunk(c), 0))  # noqa: E731
  return {
      "x": steps(p), "col": steps(1), "n": steps(n),
      "row": pl.BlockSpec((None, None, None, 1, size), lambda b, h, c: (b, h, chunk(c), 0, 0)),
      "bc": pl.BlockSpec((None, None, size, n), lambda b, h, c: (b, jax.lax.div(h, group), chunk(c), 0)),
      "D": pl.BlockSpec(memory_space=pltpu.SMEM),
      "state": pl.BlockSpec((None, None, p, n), lambda b, h, c: (b, h, 0, 0)),
      "states": pl.BlockSpec((None, None, None, p, n), lambda b, h, c: (b, h, chunk(c), 0, 0)),
  }


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_kernel(x_ref, dt_ref, lam_ref, lam_row_ref, B_ref, C_ref, D_ref, s0_ref,
                    y_ref, states_ref, final_ref, state):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _init():
    state[...] = s0_ref[...]

  S = state[...]
  states_ref[...] = S
  y, S = chunk_forward(x_ref[...], dt_ref[...], lam_ref[...], lam_row_ref[...], B_ref[...],
                       C_ref[...], D_ref[pl.program_id(1)], S)
  y_ref[...] = y.astype(y_ref.dtype)
  state[...] = S

  @pl.when(c == pl.num_programs(2) - 1)
  def _finish():
    final_ref[...] = S


def _backward_kernel(x_ref, dt_ref, lam_ref, lam_row_ref, B_ref, C_ref, D_ref, states_ref, dy_ref,
                     dfinal_ref, dx_ref, ddt_ref, dB_ref, dC_ref, ds0_ref, dstate):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _init():
    dstate[...] = dfinal_ref[...]

  dx, ddt, dB, dC, dS = chunk_backward(
      x_ref[...], dt_ref[...], lam_ref[...], lam_row_ref[...], B_ref[...], C_ref[...],
      D_ref[pl.program_id(1)], states_ref[...], dy_ref[...], dstate[...])
  dx_ref[...] = dx.astype(dx_ref.dtype)
  ddt_ref[...] = ddt
  dB_ref[...] = dB
  dC_ref[...] = dC
  dstate[...] = dS

  @pl.when(c == pl.num_programs(2) - 1)
  def _finish():
    ds0_ref[...] = dS


def _prepare(x, dt, A, B, C, chunk_size: int):
  """Padded kernel-layout inputs and the chunk length."""
  t = x.shape[1]
  size = chunk_length(chunk_size, t)
  t_pad = round_up(t, size)
  dt = pad_time(dt, t_pad)
  lam = chunk_log_decay(dt, A, size)
  inputs = (_heads_major(pad_time(x, t_pad)), _columns(dt), _columns(lam), _rows(lam, size),
            _heads_major(pad_time(B, t_pad)), _heads_major(pad_time(C, t_pad)))
  return inputs, size


def forward(x, dt, A, B, C, D, s0, chunk_size: int, interpret):
  """y [b, t, h, p], the chunk-start states [b, h, chunks, p, n] and the final state."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  (xt, dtc, lamc, lamr, Bt, Ct), size = _prepare(x, dt, A, B, C, chunk_size)
  nc = lamr.shape[2]
  sp = _specs(size, p, n, h // g, nc, reverse=False)
  y, states, final = pl.pallas_call(
      _forward_kernel, grid=(b, h, nc),
      in_specs=[sp["x"], sp["col"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["D"], sp["state"]],
      out_specs=[sp["x"], sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct(xt.shape, x.dtype), jax.ShapeDtypeStruct((b, h, nc, p, n), F32),
                 jax.ShapeDtypeStruct((b, h, p, n), F32)],
      scratch_shapes=[pltpu.VMEM((p, n), F32)],
      compiler_params=_params(), interpret=interpret, name="ssd_fwd",
  )(xt, dtc, lamc, lamr, Bt, Ct, D.astype(F32), s0.astype(F32))
  return _heads_major(y)[:, :t], states, final


def backward(x, dt, A, B, C, D, states, dy, dfinal, chunk_size: int, interpret):
  """dx [b, t, h, p], Σ_p dv ⊙ x [b, t, h], per-head dB and dC [b, t, h, n] (fp32) and
  d initial_state [b, h, p, n]."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  (xt, dtc, lamc, lamr, Bt, Ct), size = _prepare(x, dt, A, B, C, chunk_size)
  nc = lamr.shape[2]
  t_pad = nc * size
  sp = _specs(size, p, n, h // g, nc, reverse=True)
  dx, ddt, dB, dC, ds0 = pl.pallas_call(
      _backward_kernel, grid=(b, h, nc),
      in_specs=[sp["x"], sp["col"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["D"],
                sp["states"], sp["x"], sp["state"]],
      out_specs=[sp["x"], sp["col"], sp["n"], sp["n"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct(xt.shape, x.dtype), jax.ShapeDtypeStruct((b, h, t_pad, 1), F32),
                 jax.ShapeDtypeStruct((b, h, t_pad, n), F32), jax.ShapeDtypeStruct((b, h, t_pad, n), F32),
                 jax.ShapeDtypeStruct((b, h, p, n), F32)],
      scratch_shapes=[pltpu.VMEM((p, n), F32)],
      compiler_params=_params(), interpret=interpret, name="ssd_bwd",
  )(xt, dtc, lamc, lamr, Bt, Ct, D.astype(F32), states, _heads_major(pad_time(dy, t_pad)),
    dfinal.astype(F32))
  unpad = lambda v: _heads_major(v)[:, :t]  # noqa: E731
  return unpad(dx), unpad(ddt)[..., 0], unpad(dB), unpad(dC), ds0
