"""Pallas GPU kernels for SSD (Triton lowering), parallel over chunks.

The chunk kernels run one program per (batch, head, chunk), as mamba_ssm's and
flash-linear-attention's chunk kernels do; the only sequential part, the state passed
from chunk to chunk, is the light `chunk_states` kernel between them. Per chunk,
with the terms of `xla.decay_terms` (M, exp(Λ), exp(γ - Λ), exp(γ)) and v = dt ⊙ x::

  ssd_chunk_state  U = (v ⊙ exp(γ - Λ))ᵀ B          the chunk's state from a zero start
  state passing    S_{c+1} = exp(γ_c) S_c + U_c       the state entering every chunk
  ssd_fwd          y = ((C Bᵀ) ⊙ M) v + exp(Λ) ⊙ (C Sᵀ) + D x

and backward, with dS the gradient of the state the chunk leaves with::

  ssd_state_grad   (dy ⊙ exp(Λ))ᵀ C                   what y sends to the entering state
  state passing    dS_{c-1} = exp(γ_c) dS_c + that    (in reverse; and d initial state)
  ssd_bwd          dv = ((C Bᵀ) ⊙ M)ᵀ dy + exp(γ - Λ) ⊙ (B dSᵀ);  dx = dv ⊙ dt + D dy
  ssd_bwd_bc       dC = (dy ⊙ exp(Λ)) S + ((dy vᵀ) ⊙ M) B;  dB = ((dy vᵀ) ⊙ M)ᵀ C + (v ⊙ exp(γ - Λ)) dS

Tiles and registers (measured with ptxas for H100 and A100, spills as errors in
tests/pallas_kernels/test_compile_targets.py): the chunk is at most 64 steps for bf16
inputs and 32 for fp32 ones (their three-pass matmuls split both operands, and at 64 the
fp32 kernels spill on A100), so an [L, L] tile (M, the scores) takes at most 16 fp32
registers per thread at 8 warps; the state dimension n is walked in blocks of `N_BLOCK`
columns, so no [L, n] or [p, n] tile of a Mamba-2 layer (n = 128) is held whole beside
them (held whole, the gradient kernels spilled kilobytes at 255 registers). Matmul
operands follow `tile_matmul.TileMatmul.for_gpu` (the fp32 path without tensor cores
spilled tens of kilobytes at these tiles). Layout is the public ``[b, t, h, ·]``; the saved states are
[b, h, chunks, p_pad, n_pad] fp32; p and n are powers of two >= 16 (the inputs are
zero-padded: padded features stay zero, padded steps have dt = 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from pallas_kernels.chunk_states import states_entering_chunks
from pallas_kernels.ssd.xla import F32, chunk_log_decay, decay_terms, pad_time, round_up
from pallas_kernels.tile_matmul import TileMatmul

MAX_CHUNK = {False: 64, True: 32}  # fp32 inputs or not
N_BLOCK = 32
NUM_WARPS = 8


@dataclasses.dataclass(frozen=True)
class _Layout:
  size: int  # chunk length
  nc: int  # number of chunks
  p: int  # padded head dim
  n: int  # padded state dim

  @property
  def t_pad(self) -> int:
    return self.size * self.nc

  @property
  def n_block(self) -> int:
    return min(N_BLOCK, self.n)


def _pow2(n: int) -> int:
  return max(16, 1 << max(n - 1, 0).bit_length())


def _layout(t: int, p: int, n: int, chunk_size: int, dtype) -> _Layout:
  size = _pow2(min(chunk_size, t, MAX_CHUNK[jnp.dtype(dtype) == F32]))
  return _Layout(size, round_up(t, size) // size, _pow2(p), _pow2(n))


def _pad_last(v: jax.Array, size: int) -> jax.Array:
  if v.shape[-1] == size:
    return v
  return jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, size - v.shape[-1])])


def _pad_state(s: jax.Array, lay: _Layout) -> jax.Array:
  """[b, h, p, n] -> [b, h, p_pad, n_pad] fp32."""
  s = _pad_last(s.astype(F32), lay.n)
  return jnp.pad(s, ((0, 0), (0, 0), (0, lay.p - s.shape[2]), (0, 0)))


def _load(x_ref, dt_ref, lam_ref):
  """A chunk's x (fp32), dt [L, 1], v = dt ⊙ x, and the decay terms of `xla.decay_terms`."""
  x32, dt, lam = x_ref[...].astype(F32), dt_ref[...][:, None], lam_ref[...]
  return x32, dt, x32 * dt, decay_terms(lam[:, None], lam[None, :])


def _state_blocks(lay: _Layout, body, init):
  """``body(columns, carry)`` over the blocks of the state dimension n."""
  def step(k, carry):
    return body(pl.ds(pl.multiple_of(k * lay.n_block, lay.n_block), lay.n_block), carry)

  return jax.lax.fori_loop(0, lay.n // lay.n_block, step, init)


def _chunk_state_kernel(x_ref, dt_ref, lam_ref, B_ref, added_ref, *, lay: _Layout, mm: TileMatmul):
  _, _, v, (_, _, e_tail, _) = _load(x_ref, dt_ref, lam_ref)
  v_tail = v * e_tail

  def block(cols, carry):
    added_ref[:, cols] = mm(v_tail, B_ref[:, cols], (0, 0))
    return carry

  _state_blocks(lay, block, 0)


def _forward_kernel(x_ref, dt_ref, lam_ref, B_ref, C_ref, D_ref, S_ref, y_ref, *, lay: _Layout, mm: TileMatmul):
  x32, _, v, (mask, e_lam, _, _) = _load(x_ref, dt_ref, lam_ref)

  def block(cols, carry):
    scores, from_state = carry
    C = C_ref[:, cols]
    return scores + mm(C, B_ref[:, cols], (1, 1)), from_state + mm(C, S_ref[:, cols], (1, 1))

  scores, from_state = _state_blocks(
      lay, block, (jnp.zeros((lay.size, lay.size), F32), jnp.zeros((lay.size, lay.p), F32)))
  y = mm(scores * mask, v) + e_lam * from_state + D_ref[...] * x32
  y_ref[...] = y.astype(y_ref.dtype)


def _state_grad_kernel(lam_ref, C_ref, dy_ref, sent_ref, *, lay: _Layout, mm: TileMatmul):
  lam = lam_ref[...]
  _, e_lam, _, _ = decay_terms(lam[:, None], lam[None, :])
  dy_lam = dy_ref[...].astype(F32) * e_lam

  def block(cols, carry):
    sent_ref[:, cols] = mm(dy_lam, C_ref[:, cols], (0, 0))
    return carry

  _state_blocks(lay, block, 0)


def _backward_kernel(x_ref, dt_ref, lam_ref, B_ref, C_ref, D_ref, dy_ref, dS_ref, dx_ref, ddt_ref, *,
                     lay: _Layout, mm: TileMatmul):
  """dx and Σ_p dv ⊙ x (the dt gradient through v)."""
  x32, dt, _, (mask, _, e_tail, _) = _load(x_ref, dt_ref, lam_ref)
  dy = dy_ref[...].astype(F32)

  def block(cols, carry):
    scores, from_state = carry
    B = B_ref[:, cols]
    return scores + mm(C_ref[:, cols], B, (1, 1)), from_state + mm(B, dS_ref[:, cols], (1, 1))

  scores, from_state = _state_blocks(
      lay, block, (jnp.zeros((lay.size, lay.size), F32), jnp.zeros((lay.size, lay.p), F32)))
  dv = mm(scores * mask, dy, (0, 0)) + e_tail * from_state
  dx_ref[...] = (dv * dt + D_ref[...] * dy).astype(dx_ref.dtype)
  ddt_ref[...] = jnp.sum(dv * x32, axis=1, keepdims=True)


def _backward_bc_kernel(x_ref, dt_ref, lam_ref, B_ref, C_ref, S_ref, dy_ref, dS_ref, dB_ref, dC_ref, *,
                        lay: _Layout, mm: TileMatmul):
  """This head's dB and dC."""
  _, _, v, (mask, e_lam, e_tail, _) = _load(x_ref, dt_ref, lam_ref)
  dy = dy_ref[...].astype(F32)
  dscores = mm(dy, v, (1, 1)) * mask
  dy_lam, v_tail = dy * e_lam, v * e_tail

  def block(cols, carry):
    dC_ref[:, cols] = mm(dy_lam, S_ref[:, cols]) + mm(dscores, B_ref[:, cols])
    dB_ref[:, cols] = mm(dscores, C_ref[:, cols], (0, 0)) + mm(v_tail, dS_ref[:, cols])
    return carry

  _state_blocks(lay, block, 0)


def _specs(lay: _Layout, group: int):
  """BlockSpecs over the grid (b, h, c): each program sees one chunk of one head."""
  steps = lambda w: pl.BlockSpec((None, lay.size, None, w), lambda b, h, c: (b, c, h, 0))  # noqa: E731
  return {
      "x": steps(lay.p), "n": steps(lay.n), "col": steps(1),
      "step": pl.BlockSpec((None, lay.size, None), lambda b, h, c: (b, c, h)),
      "bc": pl.BlockSpec((None, lay.size, None, lay.n), lambda b, h, c: (b, c, jax.lax.div(h, group), 0)),
      "D": pl.BlockSpec((None,), lambda b, h, c: (h,)),
      "state": pl.BlockSpec((None, None, None, lay.p, lay.n), lambda b, h, c: (b, h, c, 0, 0)),
  }


def _prepare(x, dt, A, B, C, lay: _Layout):
  dt = pad_time(dt.astype(F32), lay.t_pad)
  lam = chunk_log_decay(dt, A, lay.size)
  pad = lambda v, w: _pad_last(pad_time(v, lay.t_pad), w)  # noqa: E731
  return pad(x, lay.p), dt, lam, pad(B, lay.n), pad(C, lay.n)


def _chunk_decays(lam: Float[Array, "b t h"], lay: _Layout) -> Float[Array, "b h c 1"]:
  """exp(γ) of every chunk: its total decay."""
  b, _, h = lam.shape
  gamma = lam.reshape(b, lay.nc, lay.size, h)[:, :, -1]
  return jnp.exp(jnp.moveaxis(gamma, 2, 1))[..., None]


def _caller(lay: _Layout, b: int, h: int, dtype, interpret):
  """``call(kernel, in_specs, out_specs, out_shape, name)`` on the grid (b, h, chunks)."""
  mm = TileMatmul.for_gpu(dtype, bool(interpret))

  def call(kernel, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        functools.partial(kernel, lay=lay, mm=mm), grid=(b, h, lay.nc), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret, name=name)

  return call


def forward(x, dt, A, B, C, D, s0, chunk_size: int, interpret):
  """y [b, t, h, p], the chunk-start states [b, h, chunks, p_pad, n_pad] and the final state."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  lay = _layout(t, p, n, chunk_size, x.dtype)
  xp, dtp, lam, Bp, Cp = _prepare(x, dt, A, B, C, lay)
  sp = _specs(lay, h // g)
  call = _caller(lay, b, h, x.dtype, interpret)
  states_shape = jax.ShapeDtypeStruct((b, h, lay.nc, lay.p, lay.n), F32)
  added = call(_chunk_state_kernel, [sp["x"], sp["step"], sp["step"], sp["bc"]], sp["state"], states_shape,
               "ssd_chunk_state")(xp, dtp, lam, Bp)
  states, final = states_entering_chunks(_chunk_decays(lam, lay), added, _pad_state(s0, lay),
                                         interpret=interpret)
  y = call(_forward_kernel, [sp["x"], sp["step"], sp["step"], sp["bc"], sp["bc"], sp["D"], sp["state"]],
           sp["x"], jax.ShapeDtypeStruct(xp.shape, x.dtype), "ssd_fwd")(xp, dtp, lam, Bp, Cp, D.astype(F32),
                                                                        states)
  return y[:, :t, :, :p], states, final[:, :, :p, :n]


def backward(x, dt, A, B, C, D, states, dy, dfinal, chunk_size: int, interpret):
  """dx [b, t, h, p], Σ_p dv ⊙ x [b, t, h], per-head dB and dC [b, t, h, n] (fp32) and
  d initial_state [b, h, p, n]."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  lay = _layout(t, p, n, chunk_size, x.dtype)
  xp, dtp, lam, Bp, Cp = _prepare(x, dt, A, B, C, lay)
  dyp = _pad_last(pad_time(dy, lay.t_pad), lay.p)
  sp = _specs(lay, h // g)
  call = _caller(lay, b, h, x.dtype, interpret)
  sent = call(_state_grad_kernel, [sp["step"], sp["bc"], sp["x"]], sp["state"],
              jax.ShapeDtypeStruct(states.shape, F32), "ssd_state_grad")(lam, Cp, dyp)
  dleaving, ds0 = states_entering_chunks(_chunk_decays(lam, lay), sent, _pad_state(dfinal, lay),
                                         reverse=True, interpret=interpret)
  per_head = lambda w: jax.ShapeDtypeStruct((b, lay.t_pad, h, w), F32)  # noqa: E731
  dx, ddt = call(
      _backward_kernel,
      [sp["x"], sp["step"], sp["step"], sp["bc"], sp["bc"], sp["D"], sp["x"], sp["state"]],
      [sp["x"], sp["col"]], [jax.ShapeDtypeStruct(xp.shape, x.dtype), per_head(1)],
      "ssd_bwd")(xp, dtp, lam, Bp, Cp, D.astype(F32), dyp, dleaving)
  dB, dC = call(
      _backward_bc_kernel,
      [sp["x"], sp["step"], sp["step"], sp["bc"], sp["bc"], sp["state"], sp["x"], sp["state"]],
      [sp["n"], sp["n"]], [per_head(lay.n), per_head(lay.n)],
      "ssd_bwd_bc")(xp, dtp, lam, Bp, Cp, states, dyp, dleaving)
  return dx[:, :t, :, :p], ddt[:, :t, :, 0], dB[:, :t, :, :n], dC[:, :t, :, :n], ds0[:, :, :p, :n]
