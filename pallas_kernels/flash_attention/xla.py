"""Blocked online-softmax attention in plain JAX (FlashAttention-2's algorithm with the
query loop vectorized): one ``lax.scan`` over key blocks, so memory is linear in the
sequence length forward and backward. Usable on any backend; the CPU path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import (
    MASK_VALUE, MaskParams, logsumexp, pad_axis, round_up, score_grad, tile_scores,
)

DEFAULT_BLOCK_K = 512


def key_block(block_k: int, s: int) -> int:
  """The key block: never longer than the keys (padding short sequences is waste)."""
  return min(block_k, s)


def _layout(q, k, v, q_seg, kv_seg, block_k):
  """q [b, hkv, g, t, d]; k, v [nk, b, hkv, bk, d]; segments broadcastable to scores."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  s_pad = round_up(s, block_k)
  nk = s_pad // block_k
  q5 = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)

  def blocks(x):  # [b, s, hkv, width] -> [nk, b, hkv, bk, width]
    x = pad_axis(x, 1, s_pad).reshape(b, nk, block_k, hkv, x.shape[-1])
    return x.transpose(1, 0, 3, 2, 4)

  q_seg5 = None if q_seg is None else q_seg[:, None, None, :, None]
  kv_seg_blocks = None
  if kv_seg is not None:
    kv_seg_blocks = pad_axis(kv_seg, 1, s_pad, -1).reshape(b, nk, block_k).transpose(1, 0, 2)
    kv_seg_blocks = kv_seg_blocks[:, :, None, None, None, :]
  return q5, blocks(k), blocks(v), q_seg5, kv_seg_blocks, nk


def _tile(q5, k_blk, q_seg5, kv_seg_blk, slopes5, j, block_k, p: MaskParams):
  """Scores [b, hkv, g, t, bk] of key block j and which of them are visible."""
  t = q5.shape[3]
  q_pos = (jnp.arange(t, dtype=jnp.int32) + p.q_offset).reshape(1, 1, 1, t, 1)
  k_pos = (j * block_k + jnp.arange(block_k, dtype=jnp.int32)).reshape(1, 1, 1, 1, block_k)
  return tile_scores(q5, k_blk[:, :, None], q_pos, k_pos, q_seg5, kv_seg_blk, slopes5, p)


def _slopes(slopes, q):
  """ALiBi slopes [hq] as [1, hkv, g, 1, 1], or None."""
  if slopes is None:
    return None
  return slopes.astype(jnp.float32).reshape(1, -1, q.shape[2], 1, 1)


def _forward(q, k, v, q_seg, kv_seg, slopes, p: MaskParams, block_k: int):
  block_k = key_block(block_k, k.shape[1])
  b, t, hq, _ = q.shape
  dv = v.shape[3]
  q5, k_blocks, v_blocks, q_seg5, kv_seg_blocks, nk = _layout(q, k, v, q_seg, kv_seg, block_k)
  q5 = q5.astype(jnp.float32)
  slopes5 = _slopes(slopes, q5)
  shape = q5.shape[:-1] + (1,)

  def step(carry, xs):
    m, l, acc = carry
    j, k_blk, v_blk, kv_seg_blk = xs
    s, mask = _tile(q5, k_blk.astype(jnp.float32), q_seg5, kv_seg_blk, slopes5, j, block_k, p)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    probs = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + probs.sum(axis=-1, keepdims=True)
    acc = alpha * acc + jnp.einsum("bkgts,bksd->bkgtd", probs, v_blk.astype(jnp.float32))
    return (m_new, l, acc), None

  init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(q5.shape[:-1] + (dv,), jnp.float32))
  xs = (jnp.arange(nk), k_blocks, v_blocks, kv_seg_blocks)
  (m, l, acc), _ = jax.lax.scan(step, init, xs)
  out5 = acc / jnp.where(l > 0, l, 1.0)
  out = out5.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dv).astype(q.dtype)
  return out, logsumexp(m, l)  # lse [b, hkv, g, t, 1]


def _backward(q, k, v, q_seg, kv_seg, slopes, out, lse, dout, p: MaskParams, block_k: int):
  block_k = key_block(block_k, k.shape[1])
  b, t, hq, d = q.shape
  s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  q5, k_blocks, v_blocks, q_seg5, kv_seg_blocks, nk = _layout(q, k, v, q_seg, kv_seg, block_k)
  q5 = q5.astype(jnp.float32)
  slopes5 = _slopes(slopes, q5)
  do5 = dout.reshape(b, t, hkv, hq // hkv, dv).transpose(0, 2, 3, 1, 4).astype(jnp.float32)
  o5 = out.reshape(b, t, hkv, hq // hkv, dv).transpose(0, 2, 3, 1, 4).astype(jnp.float32)
  delta = jnp.sum(do5 * o5, axis=-1, keepdims=True)

  def step(dq, xs):
    j, k_blk, v_blk, kv_seg_blk = xs
    k_blk, v_blk = k_blk.astype(jnp.float32), v_blk.astype(jnp.float32)
    s, mask = _tile(q5, k_blk, q_seg5, kv_seg_blk, slopes5, j, block_k, p)
    probs = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs, do5)
    dp = jnp.einsum("bkgtd,bksd->bkgts", do5, v_blk)
    ds = score_grad(probs * (dp - delta), s, p)
    dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, k_blk)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q5)
    return dq, (dk, dv)

  xs = (jnp.arange(nk), k_blocks, v_blocks, kv_seg_blocks)
  dq5, (dk_blocks, dv_blocks) = jax.lax.scan(step, jnp.zeros_like(q5), xs)

  def unblock(x):  # [nk, b, hkv, bk, width] -> [b, s, hkv, width]
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * block_k, hkv, x.shape[-1])[:, :s_len]

  dq = dq5.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
  return dq, unblock(dk_blocks).astype(k.dtype), unblock(dv_blocks).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def attention_xla(q, k, v, q_seg, kv_seg, slopes, p: MaskParams, block_k: int = DEFAULT_BLOCK_K):
  """Attention over layout [b, t, h, d]; segments are [b, t] / [b, s] int arrays or None;
  ALiBi slopes [hq] or None (constants: they get no gradient)."""
  return _forward(q, k, v, q_seg, kv_seg, slopes, p, block_k)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, slopes, p, block_k):
  out, lse = _forward(q, k, v, q_seg, kv_seg, slopes, p, block_k)
  return out, (q, k, v, q_seg, kv_seg, slopes, out, lse)


def _attention_bwd(p, block_k, residuals, dout):
  q, k, v, q_seg, kv_seg, slopes, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, slopes, out, lse, dout, p, block_k)
  return dq, dk, dv, None, None, None


attention_xla.defvjp(_attention_fwd, _attention_bwd)
