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

from pallas_kernels.tile_matmul import TileMatmul

SUB = 16  # rows per sub-block: the per-element (diagonal) part costs SUB · dk per step


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


def _diag_dq(k, g, da) -> jax.Array:
  """dq [SUB, dk] of one diagonal sub-block from dA (already causal-masked)."""

  def body(j, dq):
    decay, _ = _decay_from(g, j)
    return dq + _col(da, j) * decay * _row(k, j)  # dA_ij exp(G_i - G_j) k_j, rows i

  return jax.lax.fori_loop(0, SUB, body, jnp.zeros(k.shape, jnp.float32))


def _diag_dk(q, g, da) -> jax.Array:
  """dk [SUB, dk] of one diagonal sub-block from dA (already causal-masked)."""

  def body(j, dk):
    decay, is_j = _decay_from(g, j)
    return jnp.where(is_j, jnp.sum(_col(da, j) * decay * q, axis=0, keepdims=True), dk)

  return jax.lax.fori_loop(0, SUB, body, jnp.zeros(q.shape, jnp.float32))


def _before(start: int, c: int) -> jax.Array:
  """[1, c] mask of the chunk rows before ``start``."""
  return _iota((1, c), 1) < start


def _after(start: int, c: int) -> jax.Array:
  """[1, c] mask of the chunk rows from ``start`` on."""
  return _iota((1, c), 1) >= start


def chunk_outputs(q_ref, k_ref, v_ref, g_ref, o_ref, state_t, base, c: int, scale: float,
                  mm: TileMatmul = TileMatmul()) -> None:
  """Writes o for the chunk's c rows from ``base``, entered with Sᵀ = ``state_t``."""
  chunk = lambda ref: _load(ref, base, c)  # noqa: E731  (loaded where used: fewer live values)
  for start in range(0, c, SUB):
    rows = pl.ds(base + start, SUB)
    q, k, v, g = (_load(r, base + start, SUB) for r in (q_ref, k_ref, v_ref, g_ref))
    q = q * scale
    o = mm(q * jnp.exp(g), state_t, (1, 1)) + mm(_diag_scores(q, k, g), v)
    if start:  # earlier sub-blocks, with this sub-block's first row as reference
      ref = _row(g, 0)
      k_ref_ = chunk(k_ref) * jnp.exp(jnp.minimum(ref - chunk(g_ref), 0.0))
      scores = jnp.where(_before(start, c), mm(q * jnp.exp(g - ref), k_ref_, (1, 1)), 0.0)
      o = o + mm(scores, chunk(v_ref))
    o_ref[rows, :] = o.astype(o_ref.dtype)


def chunk_decay(g_ref, base, c: int) -> jax.Array:
  """exp(G_last) [1, dk]: the decay of the state's columns over the chunk."""
  return jnp.exp(_row(_load(g_ref, base, c), c - 1))


def chunk_added_state(k_ref, v_ref, g_ref, base, c: int, mm: TileMatmul = TileMatmul()) -> jax.Array:
  """(k ⊙ exp(G_last - G))ᵀ v as Sᵀ [dv, dk]: what the chunk adds to a zero state."""
  g_all = _load(g_ref, base, c)
  return mm(_load(v_ref, base, c), _load(k_ref, base, c) * jnp.exp(_row(g_all, c - 1) - g_all), (0, 0))


def forward_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, state_t, base, c: int, scale: float):
  """Writes o for the chunk's c rows from ``base`` and returns the next Sᵀ [dv, dk]."""
  chunk_outputs(q_ref, k_ref, v_ref, g_ref, o_ref, state_t, base, c, scale)
  return chunk_decay(g_ref, base, c) * state_t + chunk_added_state(k_ref, v_ref, g_ref, base, c)


# The gradients of one sub-block of rows from ``start``: ``ins`` = its (q · scale, k, v, g,
# do) in fp32, ``chunk(name)`` loads the whole chunk of q, k, v, g or do. The states are arrays, or refs read
# where used (fewer live registers in the GPU kernels).


def _sub_dq(ins, chunk, start: int, c: int, state_t, mm: TileMatmul) -> jax.Array:
  """dq (of the scaled q) from the diagonal, the entering state and the earlier keys."""
  _, k, v, g, do = ins
  dq = _diag_dq(k, g, jnp.where(_causal(SUB), mm(do, v, (1, 1)), 0.0)) + mm(do, state_t[...]) * jnp.exp(g)
  if start:  # reference: the sub-block's first row
    ref = _row(g, 0)
    k_ref_ = chunk("k") * jnp.exp(jnp.minimum(ref - chunk("g"), 0.0))
    da_off = jnp.where(_before(start, c), mm(do, chunk("v"), (1, 1)), 0.0)
    dq = dq + mm(da_off, k_ref_) * jnp.exp(g - ref)
  return dq


def _sub_dk(ins, chunk, start: int, c: int, scale: float, last, dstate_t, mm: TileMatmul) -> jax.Array:
  """dk from the diagonal, the leaving state's gradient and the later queries."""
  q, _, v, g, do = ins
  dk = _diag_dk(q, g, jnp.where(_causal(SUB), mm(do, v, (1, 1)), 0.0)) + mm(v, dstate_t[...]) * jnp.exp(last - g)
  if start + SUB < c:  # reference: the sub-block's last row
    ref = _row(g, SUB - 1)
    q_ref_ = chunk("q") * scale * jnp.exp(jnp.minimum(chunk("g") - ref, 0.0))
    da_t = jnp.where(_after(start + SUB, c), mm(v, chunk("do"), (1, 1)), 0.0)  # dA_ij: keys j here, queries i later
    dk = dk + mm(da_t, q_ref_) * jnp.exp(ref - g)
  return dk


def _sub_blocks(refs, base, c: int, scale: float):
  """(start, rows, ins, chunk) per sub-block of the chunk, for refs (q, k, v, g, do)."""
  named = dict(zip(("q", "k", "v", "g", "do"), refs))
  chunk = lambda name: _load(named[name], base, c)  # noqa: E731  (loaded where used: fewer live values)
  for start in range(0, c, SUB):
    q, k, v, g, do = (_load(r, base + start, SUB) for r in refs)
    yield start, pl.ds(base + start, SUB), (q * scale, k, v, g, do), chunk


def chunk_qk_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dg_ref, state_t, dstate_t, base,
                   c: int, scale: float, mm: TileMatmul = TileMatmul()) -> None:
  """Writes dq, dk and dG = q ⊙ dq - k ⊙ dk for the chunk's rows; ``state_t`` is Sᵀ
  entering the chunk, ``dstate_t`` the gradient of Sᵀ leaving it."""
  refs = (q_ref, k_ref, v_ref, g_ref, do_ref)
  last = _row(_load(g_ref, base, c), c - 1)
  for start, rows, ins, chunk in _sub_blocks(refs, base, c, scale):
    dq = _sub_dq(ins, chunk, start, c, state_t, mm)
    dk = _sub_dk(ins, chunk, start, c, scale, last, dstate_t, mm)
    dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dg_ref[rows, :] = ins[0] * dq - ins[1] * dk


def chunk_q_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dgq_ref, state_t, base, c: int, scale: float,
                  mm: TileMatmul = TileMatmul()) -> None:
  """`chunk_qk_grads`' dq and q ⊙ dq alone."""
  for start, rows, ins, chunk in _sub_blocks((q_ref, k_ref, v_ref, g_ref, do_ref), base, c, scale):
    dq = _sub_dq(ins, chunk, start, c, state_t, mm)
    dq_ref[rows, :] = (dq * scale).astype(dq_ref.dtype)
    dgq_ref[rows, :] = ins[0] * dq


def chunk_k_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dgk_ref, dstate_t, base, c: int, scale: float,
                  mm: TileMatmul = TileMatmul()) -> None:
  """`chunk_qk_grads`' dk and k ⊙ dk alone."""
  last = _row(_load(g_ref, base, c), c - 1)
  for start, rows, ins, chunk in _sub_blocks((q_ref, k_ref, v_ref, g_ref, do_ref), base, c, scale):
    dk = _sub_dk(ins, chunk, start, c, scale, last, dstate_t, mm)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dgk_ref[rows, :] = ins[1] * dk


def chunk_v_grads(q_ref, k_ref, g_ref, do_ref, dv_ref, dstate_t, base, c: int, scale: float,
                  mm: TileMatmul = TileMatmul()) -> None:
  """Writes dv for the chunk's rows; ``dstate_t`` is the gradient of Sᵀ leaving it."""
  chunk = lambda ref: _load(ref, base, c)  # noqa: E731
  last = _row(chunk(g_ref), c - 1)
  for start in range(0, c, SUB):
    rows = pl.ds(base + start, SUB)
    q, k, g, do = (_load(r, base + start, SUB) for r in (q_ref, k_ref, g_ref, do_ref))
    dv = mm(k * jnp.exp(last - g), dstate_t, (1, 1)) + mm(_diag_scores(q * scale, k, g), do, (0, 0))
    if start + SUB < c:  # this sub-block as keys of later queries; reference: its last row
      ref = _row(g, SUB - 1)
      q_ref_ = chunk(q_ref) * scale * jnp.exp(jnp.minimum(chunk(g_ref) - ref, 0.0))
      scores_t = jnp.where(_after(start + SUB, c), mm(k * jnp.exp(ref - g), q_ref_, (1, 1)), 0.0)
      dv = dv + mm(scores_t, chunk(do_ref))
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)


def chunk_state_grad(q_ref, g_ref, do_ref, base, c: int, scale: float, mm: TileMatmul = TileMatmul()):
  """doᵀ (q ⊙ exp(G)) as Sᵀ [dv, dk]: the gradient the chunk's outputs send to the state
  it is entered with."""
  return mm(_load(do_ref, base, c), _load(q_ref, base, c) * scale * jnp.exp(_load(g_ref, base, c)), (0, 0))


def backward_chunk(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref, state_t,
                   dstate_t, base, c: int, scale: float):
  """`chunk_qk_grads` and `chunk_v_grads`, returning the gradient of Sᵀ entering the chunk."""
  chunk_qk_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dg_ref, state_t, dstate_t, base, c, scale)
  chunk_v_grads(q_ref, k_ref, g_ref, do_ref, dv_ref, dstate_t, base, c, scale)
  return chunk_decay(g_ref, base, c) * dstate_t + chunk_state_grad(q_ref, g_ref, do_ref, base, c, scale)
