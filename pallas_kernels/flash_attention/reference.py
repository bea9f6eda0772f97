"""The specification: plain softmax attention in fp32, materializing [t, s] scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_attention.common import MASK_VALUE, MaskParams, tile_scores


def attention_reference(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv d"],
    *,
    causal: bool = False,
    segment_ids: tuple[Int[Array, "b t"], Int[Array, "b s"]] | None = None,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Float[Array, "hq"] | None = None,
) -> Float[Array, "b t hq d"]:
  """softmax(mask(cap(scale · q kᵀ - slope·|i - j|))) v with query head i reading kv
  head i // (hq // hkv); rows that see no key are zero. Returns q's dtype; computes in
  fp32."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  p = MaskParams(
      q_offset=s - t, kv_len=s, causal=causal, sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap, scale=d**-0.5 if scale is None else scale,
      has_segments=segment_ids is not None, has_alibi=alibi_slopes is not None,
  )
  k = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), hq // hkv, axis=2)
  q_pos = (jnp.arange(t) + s - t).reshape(1, 1, t, 1)
  k_pos = jnp.arange(s).reshape(1, 1, 1, s)
  q_seg = k_seg = None
  if segment_ids is not None:
    q_seg, k_seg = segment_ids[0][:, None, :, None], segment_ids[1][:, None, None, :]
  slope = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(1, hq, 1, 1)
  q32 = q.astype(jnp.float32).transpose(0, 2, 1, 3)
  logits, mask = tile_scores(q32, k.transpose(0, 2, 1, 3), q_pos, k_pos, q_seg, k_seg, slope, p)
  mask = jnp.broadcast_to(mask, logits.shape)
  weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  weights = jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
  out = jnp.einsum("bhts,bshd->bthd", weights, v)
  return out.astype(q.dtype)
