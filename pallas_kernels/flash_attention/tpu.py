"""Mosaic TPU kernels: forward (online softmax), dq and dk/dv backward.

Layout inside the kernels is ``[b, h, t, d]`` so each block's last two dims are
``(block, head_dim)``. Row statistics (max, sum, logsumexp, delta) live in
``[rows, 128]`` lane-replicated tiles, and segment ids come lane-replicated for queries
(``[b, t, 128]``) and sublane-replicated for keys (``[b, 8, s]``): the layouts Mosaic
handles without relayouts. The grid's last axis is the reduction (``arbitrary``);
accumulators live in VMEM scratch across it. Tiles that no pair can see (causal,
sliding window, padding) are skipped. dk/dv are computed per query head; the caller
sums them over each kv head's group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.common import (
    MASK_VALUE, MaskParams, block_positions, logsumexp, pad_axis, round_up, score_grad, tile_scores,
    tile_visible,
)

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 512
  block_k: int = 512
  block_q_bwd: int = 256
  block_k_bwd: int = 256


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """A [rows, 128] lane-replicated statistic as [rows, width]."""
  reps = -(-width // LANES)
  x = jnp.tile(x, (1, reps)) if reps > 1 else x
  return x if x.shape[1] == width else x[:, :width]


def _tile(q, k, q_seg_ref, kv_seg_ref, slopes_ref, q_start, k_start, bq, bk, p: MaskParams):
  """Scores [bq, bk] of one tile and which pairs are visible."""
  q_pos, k_pos = block_positions(bq, bk, q_start, k_start, p)
  q_seg = k_seg = slope = None
  if p.has_segments:
    q_seg = _lanes(q_seg_ref[...], bk)  # [bq, bk]
    k_seg = kv_seg_ref[:1, :]  # [1, bk]
  if p.has_alibi:
    slope = slopes_ref[pl.program_id(1)]  # this query head's slope, from SMEM
  return tile_scores(q, k, q_pos, k_pos, q_seg, k_seg, slope, p)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, slopes_ref, o_ref, lse_ref,
                    m_scratch, l_scratch, acc_scratch, *, p: MaskParams, bq: int, bk: int):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(tile_visible(i * bq, bq, j * bk, bk, p))
  def _accumulate():
    v = v_ref[...]
    s, mask = _tile(q_ref[...], k_ref[...], q_seg_ref, kv_seg_ref, slopes_ref, i * bq, j * bk, bq, bk, p)
    s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_scratch[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
    probs = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(probs, axis=1)[:, None]
    m_scratch[...] = m_next
    pv = jax.lax.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scratch[...] = acc_scratch[...] * _lanes(alpha, v.shape[-1]) + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scratch[...]
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = (acc_scratch[...] * _lanes(inv, o_ref.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = logsumexp(m_scratch[...], l)


def _backward_tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                   slopes_ref, q_start, k_start, p: MaskParams, bq: int, bk: int):
  """ds [bq, bk] (the gradient of q kᵀ) and the probabilities of one tile."""
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  s, mask = _tile(q, k, q_seg_ref, kv_seg_ref, slopes_ref, q_start, k_start, bq, bk, p)
  probs = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = score_grad(probs * (dp - _lanes(delta_ref[...], bk)), s, p)
  return ds, probs, q, k, do


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, slopes_ref,
               dq_ref, dq_scratch, *, p: MaskParams, bq: int, bk: int):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  @pl.when(tile_visible(i * bq, bq, j * bk, bk, p))
  def _accumulate():
    ds, _, _, k, _ = _backward_tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                                    kv_seg_ref, slopes_ref, i * bq, j * bk, p, bq, bk)
    dq_scratch[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, slopes_ref,
                dk_ref, dv_ref, dk_scratch, dv_scratch, *, p: MaskParams, bq: int, bk: int):
  j, i = pl.program_id(2), pl.program_id(3)  # key block outer, query block inner

  @pl.when(i == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when(tile_visible(i * bq, bq, j * bk, bk, p))
  def _accumulate():
    ds, probs, q, _, do = _backward_tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                         q_seg_ref, kv_seg_ref, slopes_ref, i * bq, j * bk, p, bq, bk)
    dv_scratch[...] += jax.lax.dot(probs.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_scratch[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Padded sizes and block sizes for one call."""

  bq: int
  bk: int
  t_pad: int
  s_pad: int


def _layout(t: int, s: int, block_q: int, block_k: int) -> _Layout:
  bq = min(block_q, round_up(t, LANES))
  bk = min(block_k, round_up(s, LANES))
  return _Layout(bq, bk, round_up(t, bq), round_up(s, bk))


def _prepare(q, k, v, q_seg, kv_seg, lay: _Layout):
  """[b, t, h, d] -> padded [b, h, t, d]; segments in their TPU layouts (or None)."""
  qt = pad_axis(q, 1, lay.t_pad).transpose(0, 2, 1, 3)
  kt = pad_axis(k, 1, lay.s_pad).transpose(0, 2, 1, 3)
  vt = pad_axis(v, 1, lay.s_pad).transpose(0, 2, 1, 3)
  if q_seg is None:
    return qt, kt, vt, None, None
  q_seg = jnp.broadcast_to(pad_axis(q_seg.astype(jnp.int32), 1, lay.t_pad)[:, :, None],
                           (q.shape[0], lay.t_pad, LANES))
  kv_seg = jnp.broadcast_to(pad_axis(kv_seg.astype(jnp.int32), 1, lay.s_pad, -1)[:, None, :],
                            (q.shape[0], SUBLANES, lay.s_pad))
  return qt, kt, vt, q_seg, kv_seg


def _specs(lay: _Layout, d: int, dv: int, group: int, rows: str) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over a grid (b, h, outer, inner); ``rows`` names which of outer/inner
  walks the queries ("outer": forward and dq, "inner": dk/dv)."""
  if rows == "outer":
    qi, kj = (lambda i, j: i), (lambda i, j: j)
  else:
    qi, kj = (lambda i, j: j), (lambda i, j: i)
  bq, bk = lay.bq, lay.bk
  query = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, i, j: (b, h, qi(i, j), 0))  # noqa: E731
  key = lambda width: pl.BlockSpec(  # noqa: E731
      (None, None, bk, width), lambda b, h, i, j: (b, jax.lax.div(h, group), kj(i, j), 0))
  per_head_key = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, i, j: (b, h, kj(i, j), 0))  # noqa: E731
  return {
      "q": query(d), "o": query(dv), "k": key(d), "v": key(dv), "dk": per_head_key(d),
      "dv": per_head_key(dv), "rows": query(LANES),
      "q_seg": pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, qi(i, j), 0)),
      "kv_seg": pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kj(i, j))),
  }


def _segment_specs(specs, p: MaskParams):
  return [specs["q_seg"], specs["kv_seg"]] if p.has_segments else [None, None]


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _slopes_spec(p: MaskParams):
  return pl.BlockSpec(memory_space=pltpu.SMEM) if p.has_alibi else None


def forward(q, k, v, q_seg, kv_seg, slopes, p: MaskParams, blocks: BlockSizes, interpret):
  """Returns out [b, t, hq, dv] and lse [b, hq, t_pad, 128] (padded, lane-replicated)."""
  b, t, hq, d = q.shape
  s, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  lay = _layout(t, s, blocks.block_q, blocks.block_k)
  qt, kt, vt, q_seg, kv_seg = _prepare(q, k, v, q_seg, kv_seg, lay)
  specs = _specs(lay, d, dv, hq // hkv, "outer")
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, p=p, bq=lay.bq, bk=lay.bk),
      grid=(b, hq, lay.t_pad // lay.bq, lay.s_pad // lay.bk),
      in_specs=[specs["q"], specs["k"], specs["v"], *_segment_specs(specs, p), _slopes_spec(p)],
      out_specs=[specs["o"], specs["rows"]],
      out_shape=[jax.ShapeDtypeStruct((b, hq, lay.t_pad, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, lay.t_pad, LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((lay.bq, LANES), jnp.float32), pltpu.VMEM((lay.bq, LANES), jnp.float32),
                      pltpu.VMEM((lay.bq, dv), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="flash_attention_fwd",
  )(qt, kt, vt, q_seg, kv_seg, slopes)
  return out.transpose(0, 2, 1, 3)[:, :t], lse


def backward(q, k, v, q_seg, kv_seg, slopes, out, lse, dout, p: MaskParams, blocks: BlockSizes,
             interpret):
  """dq [b, t, hq, d] and per-query-head dk [b, s, hq, d], dv [b, s, hq, dv]."""
  b, t, hq, d = q.shape
  s, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  lay = _layout(t, s, blocks.block_q_bwd, blocks.block_k_bwd)
  fwd_lay = _layout(t, s, blocks.block_q, blocks.block_k)
  qt, kt, vt, q_seg, kv_seg = _prepare(q, k, v, q_seg, kv_seg, lay)
  dot_ = pad_axis(dout, 1, lay.t_pad).transpose(0, 2, 1, 3)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, t, hq]
  delta = jnp.broadcast_to(pad_axis(delta, 1, lay.t_pad).transpose(0, 2, 1)[..., None],
                           (b, hq, lay.t_pad, LANES))
  lse = pad_axis(lse[:, :, :t], 2, lay.t_pad, jnp.inf) if fwd_lay.t_pad != lay.t_pad else lse
  inputs = (qt, kt, vt, dot_, lse, delta, q_seg, kv_seg, slopes)

  def in_specs(specs):
    return [specs["q"], specs["k"], specs["v"], specs["o"], specs["rows"], specs["rows"],
            *_segment_specs(specs, p), _slopes_spec(p)]

  nq, nk = lay.t_pad // lay.bq, lay.s_pad // lay.bk
  specs = _specs(lay, d, dv, hq // hkv, "outer")
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, bq=lay.bq, bk=lay.bk),
      grid=(b, hq, nq, nk), in_specs=in_specs(specs), out_specs=specs["q"],
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((lay.bq, d), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="flash_attention_dq",
  )(*inputs)
  specs = _specs(lay, d, dv, hq // hkv, "inner")
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, bq=lay.bq, bk=lay.bk),
      grid=(b, hq, nk, nq), in_specs=in_specs(specs), out_specs=[specs["dk"], specs["dv"]],
      out_shape=[jax.ShapeDtypeStruct((b, hq, lay.s_pad, d), k.dtype),
                 jax.ShapeDtypeStruct((b, hq, lay.s_pad, dv), v.dtype)],
      scratch_shapes=[pltpu.VMEM((lay.bk, d), jnp.float32), pltpu.VMEM((lay.bk, dv), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="flash_attention_dkv",
  )(*inputs)
  unpad = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]  # noqa: E731
  return unpad(dq, t), unpad(dk, s), unpad(dv_, s)
