"""Mask semantics and per-block math shared by the fast paths (the XLA path and the
Pallas kernels); the reference (``reference.py``) is written apart from them.

Positions: query i of t sits at position ``i + s - t`` among the s keys (queries are
the last t positions, as when decoding against a cache). A query sees key j when

  j < kv_len                       (not padding)
  and (not causal  or  q_pos >= j)
  and (window is None  or  0 <= q_pos - j < window)     (Mistral's convention)
  and (no segments  or  q_segment == kv_segment)

Scores are ``scale · q·k``, minus ``slope_h · |q_pos - k_pos|`` with ALiBi slopes
(Press et al. 2022; per query head, constants), then ``cap · tanh(scores / cap)`` with
a soft cap. A query
that sees no key outputs zeros; its logsumexp is +inf so backward passes give it no
weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK - MASK) stays 1


@dataclasses.dataclass(frozen=True)
class MaskParams:
  """Static description of the attention pattern (hashable, for jit and custom_vjp)."""

  q_offset: int  # s - t: position of query 0
  kv_len: int  # true number of keys (the kernels may see a padded k)
  causal: bool = False
  sliding_window: int | None = None
  logit_soft_cap: float | None = None
  scale: float = 1.0
  has_segments: bool = False
  has_alibi: bool = False

  def needs_mask(self, k_padded: bool) -> bool:
    return self.causal or self.sliding_window is not None or self.has_segments or k_padded


def visible(q_pos: jax.Array, k_pos: jax.Array, q_seg, k_seg, p: MaskParams) -> jax.Array:
  """Which (query, key) pairs attend. Positions and segments broadcast against each other."""
  mask = k_pos < p.kv_len
  if p.causal:
    mask = jnp.logical_and(mask, q_pos >= k_pos)
  if p.sliding_window is not None:
    mask = jnp.logical_and(mask, q_pos - k_pos < p.sliding_window)
    mask = jnp.logical_and(mask, q_pos >= k_pos)
  if p.has_segments:
    mask = jnp.logical_and(mask, q_seg == k_seg)
  return mask


def block_positions(block_q: int, block_k: int, q_start, k_start, p: MaskParams):
  """[block_q, block_k] query and key positions of a tile (2-d iotas, TPU friendly)."""
  q_pos = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0) + q_start + p.q_offset
  k_pos = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1) + k_start
  return q_pos, k_pos


def tile_visible(q_start, block_q: int, k_start, block_k: int, p: MaskParams):
  """Whether any pair of a tile can attend (segments aside): lets kernels skip tiles."""
  q_first = q_start + p.q_offset
  q_last = q_first + block_q - 1
  ok = k_start < p.kv_len
  if p.causal or p.sliding_window is not None:
    ok = jnp.logical_and(ok, k_start <= q_last)
  if p.sliding_window is not None:
    ok = jnp.logical_and(ok, k_start + block_k - 1 > q_first - p.sliding_window)
  return ok


def tile_scores(q, k, q_pos, k_pos, q_seg, k_seg, slope, p: MaskParams):
  """fp32 scores of q [..., bq, d] against k [..., bk, d] (leading dims broadcast) and
  which of them are visible; positions, segments and the ALiBi slope broadcast to
  [..., bq, bk]."""
  s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  return finish_scores(s, q_pos, k_pos, q_seg, k_seg, slope, p)


def finish_scores(qk, q_pos, k_pos, q_seg, k_seg, slope, p: MaskParams):
  """`tile_scores` from the products q·k (fp32) of a tile in either orientation
  ([bq, bk], or [bk, bq] with positions and segments laid out the same way)."""
  s = qk * p.scale
  if p.has_alibi:
    s = s - slope * jnp.abs(q_pos - k_pos).astype(jnp.float32)
  if p.logit_soft_cap is not None:
    s = p.logit_soft_cap * jnp.tanh(s / p.logit_soft_cap)
  return s, visible(q_pos, k_pos, q_seg, k_seg, p)


def score_grad(ds: jax.Array, s: jax.Array, p: MaskParams) -> jax.Array:
  """Back through the soft cap and the scale: d(q·k) from d(scores) (ALiBi is constant)."""
  if p.logit_soft_cap is not None:
    ds = ds * (1.0 - jnp.square(s / p.logit_soft_cap))
  return ds * p.scale


def logsumexp(m: jax.Array, l: jax.Array) -> jax.Array:
  """m + log(l), and +inf for rows that saw no key (l == 0)."""
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def kv_block_range(q_start, bq: int, bk: int, nk: int, p: MaskParams):
  """[lo, hi) of the key blocks a query block [q_start, q_start + bq) can see."""
  hi = min(nk, -(-p.kv_len // bk))
  lo = 0
  if p.causal or p.sliding_window is not None:
    hi = jnp.minimum(hi, jax.lax.div(q_start + bq - 1 + p.q_offset, bk) + 1)
  if p.sliding_window is not None:
    lo = jnp.maximum(0, jax.lax.div(q_start + p.q_offset - p.sliding_window + 1, bk))
  return lo, jnp.maximum(hi, lo)


def q_block_range(k_start, bq: int, bk: int, nq: int, p: MaskParams):
  """[lo, hi) of the query blocks that can see the key block [k_start, k_start + bk)."""
  lo, hi = 0, nq
  if p.causal or p.sliding_window is not None:
    lo = jnp.maximum(0, jax.lax.div(k_start - p.q_offset, bq))
  if p.sliding_window is not None:
    reach = k_start + bk - 1 + p.sliding_window - p.q_offset
    hi = jnp.clip(jax.lax.div(reach + bq - 1, bq), 0, nq)
  return lo, jnp.maximum(hi, lo)
