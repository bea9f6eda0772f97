"""The specification: plain softmax attention in fp32, materializing [t, s] scores.

Written from the formulas alone; it shares no code with the XLA path or the kernels
(which share their tile math in ``common.py``), so a wrong sign or mask there cannot
hide behind the same mistake here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _visible(t: int, s: int, causal: bool, sliding_window: int | None,
             segment_ids: tuple[Int[Array, "b t"], Int[Array, "b s"]] | None) -> Bool[Array, "b 1 t s"]:
  """Query i sits at position i + s - t (the last t of s positions). It sees key j when
  j <= that position (causal), 0 <= position - j < window (sliding window, Mistral's
  convention), and the two share a segment."""
  q_pos = jnp.arange(s - t, s)[:, None]
  k_pos = jnp.arange(s)[None, :]
  distance = q_pos - k_pos
  mask = jnp.ones((t, s), dtype=bool)
  if causal:
    mask &= distance >= 0
  if sliding_window is not None:
    mask &= (distance >= 0) & (distance < sliding_window)
  mask = mask[None, None]
  if segment_ids is not None:
    q_seg, k_seg = segment_ids
    mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
  return mask


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
  """softmax(mask(cap · tanh((scale · q kᵀ - slope_h · |i - j|) / cap))) v (ALiBi: Press
  et al. 2022, eq. of §3; soft cap: Gemma 2) with query head h reading kv head
  h // (hq // hkv); rows that see no key are zero. Returns q's dtype; computes in fp32."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  qf = q.astype(jnp.float32).reshape(b, t, hkv, group, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).reshape(b, hq, t, s)
  scores = scores * (d**-0.5 if scale is None else scale)
  if alibi_slopes is not None:
    distance = jnp.abs(jnp.arange(s - t, s)[:, None] - jnp.arange(s)[None, :]).astype(jnp.float32)[None, None]
    scores = scores - alibi_slopes.astype(jnp.float32)[None, :, None, None] * distance
  if logit_soft_cap is not None:
    scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
  mask = jnp.broadcast_to(_visible(t, s, causal, sliding_window, segment_ids), scores.shape)
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(row_max)), 0.0)
  total = e.sum(axis=-1, keepdims=True)
  weights = e / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bhts,bshd->bthd", weights,
                   jnp.repeat(v.astype(jnp.float32), group, axis=2), precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)
