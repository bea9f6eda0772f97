"""Pallas GPU kernels for SSD (Triton lowering): the forward and the backward.

One program per (batch, head) loops over the chunks in order (forward) or in reverse
(backward), carrying the state [p, n] (or its gradient) in fp32 registers; the
per-chunk math is `xla.chunk_forward` / `xla.chunk_backward`. The forward stores the
state at the start of every chunk, which the backward recomputes each chunk from.
Layout is the public ``[b, t, h, ·]``. The chunk (at most 64), p and n are powers of two
>= 16 (the inputs are zero-padded: padded features stay zero, padded steps have dt = 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ssd.xla import F32, chunk_backward, chunk_forward, chunk_log_decay, pad_time, round_up


# [L, L] fp32 tiles live in registers: longer chunks would spill (FLA uses 64 as well).
MAX_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class _Layout:
  size: int  # chunk length
  nc: int  # number of chunks
  p: int  # padded head dim
  n: int  # padded state dim

  @property
  def t_pad(self) -> int:
    return self.size * self.nc


def _pow2(n: int) -> int:
  return max(16, 1 << max(n - 1, 0).bit_length())


def _layout(t: int, p: int, n: int, chunk_size: int) -> _Layout:
  size = _pow2(min(chunk_size, t, MAX_CHUNK))
  return _Layout(size, round_up(t, size) // size, _pow2(p), _pow2(n))


def _pad_last(v: jax.Array, size: int) -> jax.Array:
  if v.shape[-1] == size:
    return v
  return jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, size - v.shape[-1])])


def _pad_state(s: jax.Array, lay: _Layout) -> jax.Array:
  """[b, h, p, n] -> [b, h, p_pad, n_pad] fp32."""
  s = _pad_last(s.astype(F32), lay.n)
  return jnp.pad(s, ((0, 0), (0, 0), (0, lay.p - s.shape[2]), (0, 0)))


def _chunk(lay: _Layout, c):
  return pl.ds(pl.multiple_of(c * lay.size, lay.size), lay.size)


def _load(x_ref, dt_ref, lam_ref, B_ref, C_ref, rows):
  """One chunk of the inputs, with dt and Λ as columns and Λ once more as a row."""
  dt, lam = dt_ref[rows], lam_ref[rows]
  return x_ref[rows, :], dt[:, None], lam[:, None], lam[None, :], B_ref[rows, :], C_ref[rows, :]


def _forward_kernel(x_ref, dt_ref, lam_ref, B_ref, C_ref, D_ref, s0_ref, y_ref, states_ref,
                    final_ref, *, lay: _Layout):
  D = D_ref[...]

  def body(c, S):
    rows = _chunk(lay, c)
    states_ref[pl.ds(pl.multiple_of(c * lay.p, lay.p), lay.p), :] = S
    y, S = chunk_forward(*_load(x_ref, dt_ref, lam_ref, B_ref, C_ref, rows), D, S)
    y_ref[rows, :] = y.astype(y_ref.dtype)
    return S

  final_ref[...] = jax.lax.fori_loop(0, lay.nc, body, s0_ref[...])


def _backward_kernel(x_ref, dt_ref, lam_ref, B_ref, C_ref, D_ref, states_ref, dy_ref, dfinal_ref,
                     dx_ref, ddt_ref, dB_ref, dC_ref, ds0_ref, *, lay: _Layout):
  D = D_ref[...]

  def body(i, dS):
    c = lay.nc - 1 - i
    rows = _chunk(lay, c)
    S = states_ref[pl.ds(pl.multiple_of(c * lay.p, lay.p), lay.p), :]
    dx, ddt, dB, dC, dS = chunk_backward(*_load(x_ref, dt_ref, lam_ref, B_ref, C_ref, rows), D, S,
                                         dy_ref[rows, :], dS)
    dx_ref[rows, :] = dx.astype(dx_ref.dtype)
    ddt_ref[rows, :] = ddt
    dB_ref[rows, :] = dB
    dC_ref[rows, :] = dC
    return dS

  ds0_ref[...] = jax.lax.fori_loop(0, lay.nc, body, dfinal_ref[...])


def _specs(lay: _Layout, group: int):
  """BlockSpecs over the grid (b, h): each program sees its head's whole sequence."""
  seq = lambda w: pl.BlockSpec((None, lay.t_pad, None, w), lambda b, h: (b, 0, h, 0))  # noqa: E731
  return {
      "x": seq(lay.p), "n": seq(lay.n), "col": seq(1),
      "step": pl.BlockSpec((None, lay.t_pad, None), lambda b, h: (b, 0, h)),
      "bc": pl.BlockSpec((None, lay.t_pad, None, lay.n), lambda b, h: (b, 0, jax.lax.div(h, group), 0)),
      "D": pl.BlockSpec((None,), lambda b, h: (h,)),
      "state": pl.BlockSpec((None, None, lay.p, lay.n), lambda b, h: (b, h, 0, 0)),
      "states": pl.BlockSpec((None, None, lay.nc * lay.p, lay.n), lambda b, h: (b, h, 0, 0)),
  }


def _prepare(x, dt, A, B, C, lay: _Layout):
  dt = pad_time(dt.astype(F32), lay.t_pad)
  lam = chunk_log_decay(dt, A, lay.size)
  pad = lambda v, w: _pad_last(pad_time(v, lay.t_pad), w)  # noqa: E731
  return pad(x, lay.p), dt, lam, pad(B, lay.n), pad(C, lay.n)


def _params():
  return pltriton.CompilerParams(num_warps=4, num_stages=1)


def forward(x, dt, A, B, C, D, s0, chunk_size: int, interpret):
  """y [b, t, h, p], the chunk-start states [b, h, chunks·p_pad, n_pad] and the final state."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  lay = _layout(t, p, n, chunk_size)
  inputs = _prepare(x, dt, A, B, C, lay)
  sp = _specs(lay, h // g)
  y, states, final = pl.pallas_call(
      functools.partial(_forward_kernel, lay=lay), grid=(b, h),
      in_specs=[sp["x"], sp["step"], sp["step"], sp["bc"], sp["bc"], sp["D"], sp["state"]],
      out_specs=[sp["x"], sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct(inputs[0].shape, x.dtype),
                 jax.ShapeDtypeStruct((b, h, lay.nc * lay.p, lay.n), F32),
                 jax.ShapeDtypeStruct((b, h, lay.p, lay.n), F32)],
      compiler_params=_params(), interpret=interpret, name="ssd_fwd",
  )(*inputs, D.astype(F32), _pad_state(s0, lay))
  return y[:, :t, :, :p], states, final[:, :, :p, :n]


def backward(x, dt, A, B, C, D, states, dy, dfinal, chunk_size: int, interpret):
  """dx [b, t, h, p], Σ_p dv ⊙ x [b, t, h], per-head dB and dC [b, t, h, n] (fp32) and
  d initial_state [b, h, p, n]."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  lay = _layout(t, p, n, chunk_size)
  inputs = _prepare(x, dt, A, B, C, lay)
  sp = _specs(lay, h // g)
  per_head = lambda w: jax.ShapeDtypeStruct((b, lay.t_pad, h, w), F32)  # noqa: E731
  dx, ddt, dB, dC, ds0 = pl.pallas_call(
      functools.partial(_backward_kernel, lay=lay), grid=(b, h),
      in_specs=[sp["x"], sp["step"], sp["step"], sp["bc"], sp["bc"], sp["D"], sp["states"], sp["x"],
                sp["state"]],
      out_specs=[sp["x"], sp["col"], sp["n"], sp["n"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct(inputs[0].shape, x.dtype), per_head(1), per_head(lay.n),
                 per_head(lay.n), jax.ShapeDtypeStruct((b, h, lay.p, lay.n), F32)],
      compiler_params=_params(), interpret=interpret, name="ssd_bwd",
  )(*inputs, D.astype(F32), states, _pad_last(pad_time(dy, lay.t_pad), lay.p), _pad_state(dfinal, lay))
  return dx[:, :t, :, :p], ddt[:, :t, :, 0], dB[:, :t, :, :n], dC[:, :t, :, :n], ds0[:, :, :p, :n]
