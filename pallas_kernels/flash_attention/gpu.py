"""Pallas GPU kernels: forward (online softmax), dq and dk/dv backward.

Lowered through Pallas' Triton backend, the GPU lowering of the installed jax that
supports this kernel's style (whole-tile loads, in-kernel loops over the reduction
axis); the choice is kept in this file. Layout is the public ``[b, t, h, d]``: each
program owns one (batch, head, row block) and loops over the other sequence in
tiles, skipping tiles that no pair can see. Block sizes and head_dim are powers of
two (inputs are zero-padded as needed). dk/dv are computed per query head; the caller
sums them over each kv head's group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.flash_attention.common import (
    MASK_VALUE, MaskParams, block_positions, kv_block_range, logsumexp, pad_axis, q_block_range,
    finish_scores, round_up, score_grad, tile_scores,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and Triton launch parameters. ``block_q_bwd=None`` picks the query block of
  the backward kernels by input dtype: 16 rows for fp32, 32 for bf16 / fp16.

  Measured with ptxas for H100 and A100 (causal, GQA 8:2 and MQA, prefill t < s, sliding
  window with soft cap; d 64 and 128; fp32 and bf16) no kernel spills with these
  defaults; with 4 warps, or a 64-row backward query block, fp32 at d = 128 spilled up
  to 20 KB per thread, and bf16 GQA at d = 128 8 bytes on A100. The reason: a Triton
  matmul splits its left operand's rows over the warps but gives every warp the whole
  right operand, so the tile streamed through a kernel's loop (k, v in the forward and
  dq kernels, q, do in the dk/dv kernel, which therefore multiplies keys-major) costs
  rows · d / 32 registers per thread in each warp.
  """

  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int | None = None
  block_k_bwd: int = 64
  num_warps: int = 8
  num_stages: int = 2

  def backward_query_block(self, dtype) -> int:
    if self.block_q_bwd is not None:
      return self.block_q_bwd
    return 16 if jnp.dtype(dtype).itemsize >= 4 else 32


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class _Layout:
  bq: int
  bk: int
  t_pad: int
  s_pad: int
  d_pad: int  # query/key features
  dv_pad: int  # value features


def _layout(t: int, s: int, d: int, dv: int, block_q: int, block_k: int) -> _Layout:
  bq = min(block_q, max(16, _pow2(t)))
  bk = min(block_k, max(16, _pow2(s)))
  return _Layout(bq, bk, round_up(t, bq), round_up(s, bk), max(16, _pow2(d)), max(16, _pow2(dv)))


def _tile(q, k, q_seg, kv_seg, slope, q_start, k_start, bq, bk, p: MaskParams):
  """Scores [bq, bk] of one tile and which pairs are visible."""
  q_pos, k_pos = block_positions(bq, bk, q_start, k_start, p)
  if p.has_segments:
    q_seg, kv_seg = q_seg[:, None], kv_seg[None, :]
  return tile_scores(q, k, q_pos, k_pos, q_seg, kv_seg, slope, p)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, slope_ref, o_ref, lse_ref, *,
                    p: MaskParams, lay: _Layout):
  bq, bk = lay.bq, lay.bk
  q_start = pl.program_id(2) * bq
  q = q_ref[...]
  q_seg = q_seg_ref[...] if p.has_segments else None
  slope = slope_ref[...] if p.has_alibi else None

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    kv_seg = kv_seg_ref[keys] if p.has_segments else None
    s, mask = _tile(q, k, q_seg, kv_seg, slope, q_start, j * bk, bq, bk, p)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    probs = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    alpha = jnp.exp(m - m_next)
    acc = acc * alpha[:, None] + jax.lax.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_next, alpha * l + jnp.sum(probs, axis=1), acc

  lo, hi = kv_block_range(q_start, bq, bk, lay.s_pad // bk, p)
  init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, lay.dv_pad), jnp.float32))
  m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = logsumexp(m, l)


def _tile_grads(q, k, v, do, lse, delta, q_seg, kv_seg, slope, q_start, k_start, p, lay):
  """ds (gradient of q kᵀ) and the probabilities of one [bq, bk] tile."""
  s, mask = _tile(q, k, q_seg, kv_seg, slope, q_start, k_start, lay.bq, lay.bk, p)
  probs = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return score_grad(probs * (dp - delta[:, None]), s, p), probs


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, slope_ref,
               dq_ref, *, p: MaskParams, lay: _Layout):
  bq, bk = lay.bq, lay.bk
  q_start = pl.program_id(2) * bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = q_seg_ref[...] if p.has_segments else None
  slope = slope_ref[...] if p.has_alibi else None

  def body(j, dq):
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    kv_seg = kv_seg_ref[keys] if p.has_segments else None
    ds, _ = _tile_grads(q, k, v, do, lse, delta, q_seg, kv_seg, slope, q_start, j * bk, p, lay)
    return dq + jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  lo, hi = kv_block_range(q_start, bq, bk, lay.s_pad // bk, p)
  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros((bq, lay.d_pad), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, slope_ref,
                dk_ref, dv_ref, *, p: MaskParams, lay: _Layout):
  """Tiles are computed keys-major ([bk, bq]: sᵀ = k qᵀ, dpᵀ = v doᵀ), as Triton's
  flash-attention backward does: the program's own k and v are then the left operands
  of every matmul, split across warps, and the streamed q and do the right ones (which
  every warp holds whole), so a small query block bounds the registers."""
  bq, bk = lay.bq, lay.bk
  k_start = pl.program_id(2) * bk
  k, v = k_ref[...], v_ref[...]
  kv_seg = kv_seg_ref[...][:, None] if p.has_segments else None
  slope = slope_ref[...] if p.has_alibi else None
  k_pos = jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0) + k_start
  q_first = jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1) + p.q_offset  # of query block 0

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_seg = q_seg_ref[rows][None, :] if p.has_segments else None
    qk_t = jax.lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s_t, mask_t = finish_scores(qk_t, q_first + i * bq, k_pos, q_seg, kv_seg, slope, p)
    probs_t = jnp.where(mask_t, jnp.exp(s_t - lse_ref[rows][None, :]), 0.0)
    dp_t = jax.lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds_t = score_grad(probs_t * (dp_t - delta_ref[rows][None, :]), s_t, p)
    dv = dv + jax.lax.dot(probs_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk = dk + jax.lax.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  lo, hi = q_block_range(k_start, bq, bk, lay.t_pad // bq, p)
  dk, dv = jax.lax.fori_loop(lo, hi, body, (jnp.zeros((bk, lay.d_pad), jnp.float32),
                                            jnp.zeros((bk, lay.dv_pad), jnp.float32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad(x, seq: int, d: int):
  return pad_axis(pad_axis(x, 1, seq), 3, d)


def _segments(q_seg, kv_seg, lay: _Layout):
  if q_seg is None:
    return None, None
  return (pad_axis(q_seg.astype(jnp.int32), 1, lay.t_pad),
          pad_axis(kv_seg.astype(jnp.int32), 1, lay.s_pad, -1))


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks: BlockSizes, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret, name=name,
  )


def _slope_spec(p: MaskParams):
  """This program's query head's ALiBi slope, as a scalar block."""
  return pl.BlockSpec((None,), lambda b_, h, i: (h,)) if p.has_alibi else None


def _specs(lay: _Layout, group: int, rows: str) -> dict[str, pl.BlockSpec | None]:
  """BlockSpecs over a grid (b, h, block). ``rows="q"``: a program owns a query block and
  sees every key (forward, dq); ``rows="k"``: it owns a key block and sees every query."""
  own_q, own_k = rows == "q", rows == "k"
  q_len, k_len = (lay.bq if own_q else lay.t_pad), (lay.bk if own_k else lay.s_pad)
  kv_head = lambda h: jax.lax.div(h, group)  # noqa: E731
  query = lambda w: pl.BlockSpec((None, q_len, None, w), lambda b, h, i: (b, i if own_q else 0, h, 0))  # noqa: E731
  key = lambda w: pl.BlockSpec((None, k_len, None, w), lambda b, h, i: (b, i if own_k else 0, kv_head(h), 0))  # noqa: E731
  per_head_key = lambda w: pl.BlockSpec((None, lay.bk, None, w), lambda b, h, i: (b, i, h, 0))  # noqa: E731
  return {
      "q": query(lay.d_pad), "o": query(lay.dv_pad), "k": key(lay.d_pad), "v": key(lay.dv_pad),
      "dk": per_head_key(lay.d_pad), "dv": per_head_key(lay.dv_pad),
      "rows": pl.BlockSpec((None, None, q_len), lambda b, h, i: (b, h, i if own_q else 0)),
      "q_seg": pl.BlockSpec((None, q_len), lambda b, h, i: (b, i if own_q else 0)),
      "kv_seg": pl.BlockSpec((None, k_len), lambda b, h, i: (b, i if own_k else 0)),
  }


def _extras(specs, p: MaskParams):
  """Segment and ALiBi specs (None when unused)."""
  segs = [specs["q_seg"], specs["kv_seg"]] if p.has_segments else [None, None]
  return [*segs, _slope_spec(p)]


def forward(q, k, v, q_seg, kv_seg, slopes, p: MaskParams, blocks: BlockSizes, interpret):
  """out [b, t, hq, dv] and lse [b, hq, t_pad]."""
  b, t, hq, d = q.shape
  s, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  lay = _layout(t, s, d, dv, blocks.block_q, blocks.block_k)
  qp, kp, vp = _pad(q, lay.t_pad, lay.d_pad), _pad(k, lay.s_pad, lay.d_pad), _pad(v, lay.s_pad, lay.dv_pad)
  q_seg, kv_seg = _segments(q_seg, kv_seg, lay)
  specs = _specs(lay, hq // hkv, "q")
  out, lse = _call(
      functools.partial(_forward_kernel, p=p, lay=lay), (b, hq, lay.t_pad // lay.bq),
      [specs["q"], specs["k"], specs["v"], *_extras(specs, p)], [specs["o"], specs["rows"]],
      [jax.ShapeDtypeStruct((b, lay.t_pad, hq, lay.dv_pad), q.dtype),
       jax.ShapeDtypeStruct((b, hq, lay.t_pad), jnp.float32)],
      blocks, interpret, "flash_attention_fwd",
  )(qp, kp, vp, q_seg, kv_seg, slopes)
  return out[:, :t, :, :dv], lse


def backward(q, k, v, q_seg, kv_seg, slopes, out, lse, dout, p: MaskParams, blocks: BlockSizes,
             interpret):
  """dq [b, t, hq, d] and per-query-head dk [b, s, hq, d], dv [b, s, hq, dv]."""
  b, t, hq, d = q.shape
  s, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  lay = _layout(t, s, d, dv, blocks.backward_query_block(q.dtype), blocks.block_k_bwd)
  qp, dop = _pad(q, lay.t_pad, lay.d_pad), _pad(dout, lay.t_pad, lay.dv_pad)
  kp, vp = _pad(k, lay.s_pad, lay.d_pad), _pad(v, lay.s_pad, lay.dv_pad)
  q_seg, kv_seg = _segments(q_seg, kv_seg, lay)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  delta = pad_axis(delta, 2, lay.t_pad)  # [b, hq, t_pad]
  lse = pad_axis(lse[:, :, :t], 2, lay.t_pad, jnp.inf)
  inputs = (qp, kp, vp, dop, lse, delta, q_seg, kv_seg, slopes)

  def in_specs(specs):
    return [specs["q"], specs["k"], specs["v"], specs["o"], specs["rows"], specs["rows"],
            *_extras(specs, p)]

  specs = _specs(lay, hq // hkv, "q")
  dq = _call(
      functools.partial(_dq_kernel, p=p, lay=lay), (b, hq, lay.t_pad // lay.bq), in_specs(specs),
      specs["q"], jax.ShapeDtypeStruct(qp.shape, q.dtype), blocks, interpret, "flash_attention_dq",
  )(*inputs)
  specs = _specs(lay, hq // hkv, "k")
  dk, dv_ = _call(
      functools.partial(_dkv_kernel, p=p, lay=lay), (b, hq, lay.s_pad // lay.bk), in_specs(specs),
      [specs["dk"], specs["dv"]],
      [jax.ShapeDtypeStruct((b, lay.s_pad, hq, lay.d_pad), k.dtype),
       jax.ShapeDtypeStruct((b, lay.s_pad, hq, lay.dv_pad), v.dtype)],
      blocks, interpret, "flash_attention_dkv",
  )(*inputs)
  return dq[:, :t, :, :d], dk[:, :s, :, :d], dv_[:, :s, :, :dv]
