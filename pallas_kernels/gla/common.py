"""Chunk sizes, padding and the per-chunk math shared by the Pallas kernels.

Notation, per (batch, head) and chunk of C steps: G = cumsum of log_g within the chunk
(so G <= 0 and non-increasing), S the [dk, dv] state entering the chunk, q already
multiplied by the scale. Then (fla's chunk_gla; research notes §2)

  o_i    = (q_i ⊙ exp(G_i)) S + Σ_{j<=i} A_ij v_j,   A_ij = Σ_d q_id k_jd exp(G_id - G_jd)
  S_next = exp(G_last) ⊙ S + (k ⊙ exp(G_last - G))ᵀ v

A is built per sub-block of ``SUB`` rows. Off the diagonal a reference row r sits
between key j and query i, and A_ij = (q_i ⊙ exp(G_i - G_r)) · (k_j ⊙ exp(G_r - G_j)),
a matmul of two factors that are both <= 1. Diagonal sub-blocks are summed element by
element with exp(G_i - G_j), masked to j <= i. No exponent is ever positive, so strong
decays underflow harmlessly instead of overflowing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

SUB = 16  # rows per sub-block: the per-element (diagonal) part costs SUB · dk per step
DOT = dict(preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def chunk_len(t: int, chunk_size: int) -> int:
  """The chunk actually used: ``chunk_size``, shrunk (to a power of two >= 16) for short t."""
  return min(chunk_size, max(SUB, pow2(t)))


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def local_cumsum(log_g: jax.Array, chunk: int, axis: int) -> jax.Array:
  """fp32 cumsum of log_g within consecutive chunks along ``axis`` (a multiple of chunk)."""
  g = jnp.moveaxis(log_g.astype(jnp.float32), axis, 0)
  n = g.shape[0] // chunk
  g = jnp.cumsum(g.reshape(n, chunk, *g.shape[1:]), axis=1).reshape(g.shape)
  return jnp.moveaxis(g, 0, axis)


def reverse_cumsum(x: jax.Array, axis: int) -> jax.Array:
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


# In-kernel chunk math, shared by the Mosaic and the Triton kernels: 2-d values only,
# rows picked by masked sums, refs sliced at static sub-block offsets from ``base``.
# The kernels keep the state transposed, Sᵀ [dv, dk] (``state_t``), so that the per-dk
# decay scales its columns (a lane broadcast) and every product is a plain matmul.


def _load(ref, start, size: int) -> jax.Array:
  return ref[pl.ds(start, size), :].astype(jnp.float32)


def _iota(shape, dim: int) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _row(x: jax.Array, i) -> jax.Array:
  """Row i of x [n, d] as [1, d]."""
  return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def _col(x: jax.Array, j) -> jax.Array:
  """Column j of x [n, m] as [n, 1]."""
  return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.lax.dot(a, b, **DOT)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ bᵀ."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), **DOT)


def _causal(n: int) -> jax.Array:
  return _iota((n, n), 0) >= _iota((n, n), 1)


def _decay_from(g: jax.Array, j) -> tuple[jax.Array, jax.Array]:
  """exp(G_i - G_j) for the rows i of a sub-block (clamped to <= 0: rows before j are
  masked by the caller) and the row mask i == j."""
  return jnp.exp(jnp.minimum(g - _row(g, j), 0.0)), _iota(g.shape, 0) == j


def _diag_scores(q, k, g) -> jax.Array:
  """A [SUB, SUB] of one diagonal sub-block, per element in log space."""
  cols = _iota((SUB, SUB), 1)

  def body(j, a):
    decay, _ = _decay_from(g, j)
    return jnp.where(cols == j, jnp.sum(q * _row(k, j) * decay, axis=1, keepdims=True), a)

  a = jax.lax.fori_loop(0, SUB, body, jnp.zeros((SUB, SUB), jnp.float32))
  return jnp.where(_causal(SUB), a, 0.0)


def _diag_grads(q, k, g, da) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A (as `_diag_scores`), dq and dk [SUB, dk] of one diagonal sub-block from dA
  (already causal-masked), sharing each column's decay."""
  cols = _iota((SUB, SUB), 1)

  def body(j, carry):
    a, dq, dk = carry
    decay, is_j = _decay_from(g, j)
    a = jnp.where(cols == j, jnp.sum(q * _row(k, j) * decay, axis=1, keepdims=True), a)
    weighted = _col(da, j) * decay  # dA_ij exp(G_i - G_j), rows i
    dq = dq + weighted * _row(k, j)
    dk = jnp.where(is_j, jnp.sum(weighted * q, axis=0, keepdims=True), dk)
    return a, dq, dk

  zeros = jnp.zeros(q.shape, jnp.float32)
  a, dq, dk = jax.lax.fori_loop(0, SUB, body, (jnp.zeros((SUB, SUB), jnp.float32), zeros, zeros))
  return jnp.where(_causal(SUB), a, 0.0), dq, dk


def _before(start: int, c: int) -> jax.Array:
  """[1, c] mask of the chunk rows before ``start``."""
  return _iota((1, c), 1) < start


def _after(start: int, c: int) -> jax.Array:
  """[1, c] mask of the chunk rows from ``start`` on."""
  return _iota((1, c), 1) >= start


def forward_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, state_t, base, c: int, scale: float):
  """Writes o for the chunk's c rows from ``base`` and returns the next Sᵀ [dv, dk]."""
  chunk = lambda ref: _load(ref, base, c)  # noqa: E731  (loaded where used: fewer live values)
  for start in range(0, c, SUB):
    rows = pl.ds(base + start, SUB)
    q, k, v, g = (_load(r, base + start, SUB) for r in (q_ref, k_ref, v_ref, g_ref))
    q = q * scale
    o = _dot_t(q * jnp.exp(g), state_t) + _dot(_diag_scores(q, k, g), v)
    if start:  # earlier sub-blocks, with this sub-block's first row as reference
      ref = _row(g, 0)
      k_ref_ = chunk(k_ref) * jnp.exp(jnp.minimum(ref - chunk(g_ref), 0.0))
      scores = jnp.where(_before(start, c), _dot_t(q * jnp.exp(g - ref), k_ref_), 0.0)
      o = o + _dot(scores, chunk(v_ref))
    o_ref[rows, :] = o.astype(o_ref.dtype)
  g_all = chunk(g_ref)
  last = _row(g_all, c - 1)
  return jnp.exp(last) * state_t + _dot(chunk(v_ref).T, chunk(k_ref) * jnp.exp(last - g_all))


def backward_chunk(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref, state_t,
                   dstate_t, base, c: int, scale: float):
  """Writes dq, dk, dv and dG = q ⊙ dq - k ⊙ dk for the chunk's rows; ``state_t`` is Sᵀ
  entering the chunk, ``dstate_t`` the gradient of Sᵀ leaving it. Returns the gradient
  of Sᵀ entering it."""
  chunk = lambda ref: _load(ref, base, c)  # noqa: E731  (loaded where used: fewer live values)
  last = _row(chunk(g_ref), c - 1)
  for start in range(0, c, SUB):
    rows = pl.ds(base + start, SUB)
    q, k, v, g, do = (_load(r, base + start, SUB) for r in (q_ref, k_ref, v_ref, g_ref, do_ref))
    q = q * scale
    da = jnp.where(_causal(SUB), _dot_t(do, v), 0.0)
    a, dq, dk = _diag_grads(q, k, g, da)
    dq = dq + _dot(do, state_t) * jnp.exp(g)
    to_end = jnp.exp(last - g)
    dk = dk + _dot(v, dstate_t) * to_end
    dv = _dot_t(k * to_end, dstate_t) + _dot(a.T, do)
    if start:  # this sub-block as queries of earlier keys; reference: its first row
      ref = _row(g, 0)
      k_ref_ = chunk(k_ref) * jnp.exp(jnp.minimum(ref - chunk(g_ref), 0.0))
      da_off = jnp.where(_before(start, c), _dot_t(do, chunk(v_ref)), 0.0)
      dq = dq + _dot(da_off, k_ref_) * jnp.exp(g - ref)
    if start + SUB < c:  # this sub-block as keys of later queries; reference: its last row
      ref = _row(g, SUB - 1)
      later = _after(start + SUB, c)
      q_ref_ = chunk(q_ref) * scale * jnp.exp(jnp.minimum(chunk(g_ref) - ref, 0.0))
      from_ref = jnp.exp(ref - g)
      do_all = chunk(do_ref)
      dv = dv + _dot(jnp.where(later, _dot_t(k * from_ref, q_ref_), 0.0), do_all)
      da_t = jnp.where(later, _dot_t(v, do_all), 0.0)  # dA_ij for keys j here, queries i later
      dk = dk + _dot(da_t, q_ref_) * from_ref
    dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    dg_ref[rows, :] = q * dq - k * dk
  q_decayed = chunk(q_ref) * scale * jnp.exp(chunk(g_ref))
  return jnp.exp(last) * dstate_t + _dot(chunk(do_ref).T, q_decayed)
