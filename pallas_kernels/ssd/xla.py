"""Chunked SSD in plain JAX (Listing 1 of Dao & Gu 2024, ``ssd_minimal_discrete``), and
the per-chunk math that the Pallas kernels share with it.

Within a chunk of L steps, with the chunk-local cumulative log decay
``Λ_i = Σ_{k<=i} dt_k A``, ``γ = Λ_{L-1}`` and ``v = dt ⊙ x``::

  M[i, j] = exp(Λ_i - Λ_j) if i >= j else 0          (masked before the exp)
  y       = ((C Bᵀ) ⊙ M) v  +  exp(Λ) ⊙ (C S_prevᵀ)  +  D x
  S_next  = exp(γ) S_prev  +  (v ⊙ exp(γ - Λ))ᵀ B

Every exponent is <= 0 when dt >= 0 and A < 0. Across chunks a ``lax.scan`` carries S
(checkpointed per chunk, so autodiff keeps O(t / L) states); a tail that is not a
chunk multiple is padded with dt = 0, which leaves the state unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

F32 = jnp.float32


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_time(v: jax.Array, length: int) -> jax.Array:
  """Zero-pad axis 1 (time) to ``length``."""
  if v.shape[1] == length:
    return v
  widths = [(0, 0)] * v.ndim
  widths[1] = (0, length - v.shape[1])
  return jnp.pad(v, widths)


def chunk_log_decay(dt: Float[Array, "b t h"], A: Float[Array, "h"], chunk: int) -> Float[Array, "b t h"]:
  """Λ: the cumulative sum of dt·A restarted at every chunk (t a multiple of chunk)."""
  b, t, h = dt.shape
  a = dt.astype(F32) * A.astype(F32)[None, None, :]
  return jnp.cumsum(a.reshape(b, t // chunk, chunk, h), axis=2).reshape(b, t, h)


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
  """2-d matmul contracting a's axis ``contract[0]`` with b's ``contract[1]``, fp32
  accumulation; fp32 operands at full precision (no bf16 passes on TPU, no TF32 on GPU)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def decay_terms(lam: Float[Array, "l 1"], lam_row: Float[Array, "1 l"]):
  """M [L, L], exp(Λ) [L, 1], exp(γ - Λ) [L, 1] and exp(γ) [1, 1] of one chunk."""
  size = lam.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
  causal = rows >= cols
  mask = jnp.where(causal, jnp.exp(jnp.where(causal, lam - lam_row, 0.0)), 0.0)
  last = jax.lax.broadcasted_iota(jnp.int32, lam_row.shape, 1) == size - 1
  gamma = jnp.sum(jnp.where(last, lam_row, 0.0), axis=1, keepdims=True)
  return mask, jnp.exp(lam), jnp.exp(gamma - lam), jnp.exp(gamma)


def chunk_forward(x, dt, lam, lam_row, B, C, D, S):
  """One chunk: x [L, p], dt and Λ [L, 1], Λ again as [1, L], B and C [L, n], D a
  scalar, S_prev [p, n] fp32 -> y [L, p] fp32 and S_next [p, n] fp32."""
  x32, B32, C32 = x.astype(F32), B.astype(F32), C.astype(F32)
  v = x32 * dt
  mask, e_lam, e_tail, e_gamma = decay_terms(lam, lam_row)
  scores = dot(C, B, (1, 1)) * mask
  y = dot(scores, v) + e_lam * dot(C32, S, (1, 1)) + D * x32
  return y, e_gamma * S + dot(v * e_tail, B32, (0, 0))


def chunk_backward(x, dt, lam, lam_row, B, C, D, S, dy, dS):
  """Gradients of one chunk (S_prev as saved by the forward, dS = d S_next):
  dx [L, p], the part of d dt through v (Σ_p dv ⊙ x) [L, 1], dB and dC [L, n] (this
  head only), and d S_prev [p, n]; all fp32. The gradient through Λ is left to the
  caller (see ops: it follows from C·dC - B·dB)."""
  x32, B32, C32, dy = x.astype(F32), B.astype(F32), C.astype(F32), dy.astype(F32)
  v = x32 * dt
  mask, e_lam, e_tail, e_gamma = decay_terms(lam, lam_row)
  scores = dot(C, B, (1, 1)) * mask
  dscores = dot(dy, v, (1, 1)) * mask
  dy_lam = dy * e_lam
  dC = dot(dy_lam, S) + dot(dscores, B32)
  dB = dot(dscores, C32, (0, 0)) + dot(v * e_tail, dS)
  dv = dot(scores, dy, (0, 0)) + e_tail * dot(B32, dS, (1, 1))
  dx = dv * dt + D * dy
  ddt = jnp.sum(dv * x32, axis=1, keepdims=True)
  return dx, ddt, dB, dC, e_gamma * dS + dot(dy_lam, C32, (0, 0))


def _head_step(x, dt, lam, B, C, D, S):
  """chunk_forward on 1-d per-step dt and Λ (the XLA layout)."""
  return chunk_forward(x, dt[:, None], lam[:, None], lam[None, :], B, C, D, S)


# vmapped over heads of a group (sharing B and C), over groups, then over batch.
_step = jax.vmap(jax.vmap(jax.vmap(_head_step, (0, 0, 0, None, None, 0, 0)), (0,) * 7),
                 (0, 0, 0, 0, 0, None, 0))


def expand_groups(v: Float[Array, "b t g n"], heads: int) -> Float[Array, "b t h n"]:
  """B or C per head: head i reads group i // (heads // g)."""
  return jnp.repeat(v, heads // v.shape[2], axis=2)


def ssd_sequential(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, "h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    D: Float[Array, "h"],
    initial_state: Float[Array, "b h p n"],
):
  """The recurrence step by step (``lax.scan`` over time, fp32): y [b, t, h, p] in x's
  dtype and the final state [b, h, p, n]."""
  h = x.shape[2]
  B_h, C_h = expand_groups(B.astype(F32), h), expand_groups(C.astype(F32), h)

  def step(s, inputs):
    x_t, dt_t, B_t, C_t = inputs  # [b, h, p], [b, h], [b, h, n], [b, h, n]
    decay = jnp.exp(dt_t * A.astype(F32)[None, :])[:, :, None, None]
    s = decay * s + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    return s, jnp.einsum("bhpn,bhn->bhp", s, C_t)

  time_major = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731
  final, y = jax.lax.scan(step, initial_state.astype(F32),
                          (time_major(x.astype(F32)), time_major(dt.astype(F32)), time_major(B_h),
                           time_major(C_h)))
  y = jnp.moveaxis(y, 0, 1) + D.astype(F32)[None, None, :, None] * x.astype(F32)
  return y.astype(x.dtype), final


def ssd_xla(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, "h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    D: Float[Array, "h"],
    initial_state: Float[Array, "b h p n"],
    chunk_size: int,
):
  """y [b, t, h, p] (x's dtype) and the final state [b, h, p, n] fp32; differentiable by
  jax autodiff."""
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  size = min(chunk_size, t)
  t_pad = round_up(t, size)
  nc = t_pad // size
  lam = chunk_log_decay(pad_time(dt, t_pad), A, size)

  def chunks(v, heads):  # [b, t, heads, ...] -> [nc, b, g, heads // g, L, ...]
    v = pad_time(v, t_pad).reshape(b, nc, size, g, heads // g, *v.shape[3:])
    return jnp.moveaxis(v, (1, 2), (0, 4))

  xs = (chunks(x, h), chunks(dt.astype(F32), h), chunks(lam, h), chunks(B, g)[:, :, :, 0],
        chunks(C, g)[:, :, :, 0])
  D_g = D.astype(F32).reshape(g, h // g)
  S0 = initial_state.astype(F32).reshape(b, g, h // g, p, n)

  @jax.checkpoint
  def body(S, inputs):
    y, S = _step(*inputs[:5], D_g, S)
    return S, y

  final, y = jax.lax.scan(body, S0, xs)  # y [nc, b, g, h/g, L, p]
  y = jnp.moveaxis(y, (0, 4), (1, 2)).reshape(b, t_pad, h, p)[:, :t]
  return y.astype(x.dtype), final.reshape(b, h, p, n)
