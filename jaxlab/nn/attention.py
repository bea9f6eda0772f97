"""The attention mixer: MHA/GQA/MQA with RoPE, ALiBi, NoPE, learned or TAPE positions;
causal, sliding-window and soft-capped scores; an optional sigmoid output gate; KV
caches (a ring buffer of the window size for sliding windows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear, logical_param
from jaxlab.nn.positional import alibi_slopes, rope, rotate
from jaxlab.nn.registry import register_mixer
from jaxlab.sharding import mesh_axes_of, shard
from pallas_kernels.flash_attention.common import MASK_VALUE, MaskParams, tile_scores
from pallas_kernels.flash_attention.ops import attention_to_first_key, flash_attention

PositionState = tuple[jax.Array, jax.Array]  # TAPE's (cos, sin) features, each [b, t, h, d]


def cache_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv dv"],
    q_pos: Int[Array, "b t"],
    k_pos: Int[Array, "s"],
    k_valid: Bool[Array, "s"],
    params: MaskParams,
    slopes: Float[Array, "h"] | None,
) -> Float[Array, "b t h dv"]:
  """Attention with explicit positions (the decode path): query at q_pos sees valid keys
  under ``params``' causal / window rules, scores as in flash attention."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  q5 = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  k4 = k.transpose(0, 2, 1, 3)[:, :, None]
  slopes5 = None if slopes is None else slopes.reshape(1, kv, h // kv, 1, 1)
  valid = k_valid.astype(jnp.int32).reshape(1, 1, 1, 1, -1)
  s, mask = tile_scores(q5, k4, q_pos.reshape(b, 1, 1, t, 1), k_pos.reshape(1, 1, 1, 1, -1),
                        jnp.ones((1, 1, 1, 1, 1), jnp.int32), valid, slopes5, params)
  weights = jax.nn.softmax(jnp.where(mask, s, MASK_VALUE), axis=-1)
  weights = jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
  out = jnp.einsum("bkgts,bksd->btkgd", weights.astype(v.dtype), v.transpose(0, 2, 1, 3))
  return out.reshape(b, t, h, v.shape[-1])


@struct.dataclass
class KVCache:
  """Keys and values of past positions. Without a sliding window slot i holds position
  i; with one, a ring of ``window`` slots holds the most recent positions and
  ``positions`` says which (-1: empty)."""

  k: Float[Array, "b L kv d"]
  v: Float[Array, "b L kv dv"]
  positions: Int[Array, "L"] | None = None


@register_mixer("attention")
class Attention(nnx.Module):
  """Self-attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al. 2023),
  projections laid out ``[embed, heads, head_dim]``, over `flash_attention`."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, h, kv, hd = config.d_model, config.num_heads, config.kv_heads, config.dim_per_head
    dense = dict(use_bias=config.attention_bias, init_std=config.init_std, rngs=rngs)
    self.q = Linear((d,), (h, hd), ("embed",), ("heads", "head_dim"), **dense)
    self.k = Linear((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), **dense)
    self.v = Linear((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), **dense)
    self.o = Linear((h, hd), (d,), ("heads", "head_dim"), ("embed",), **dense)
    # Gated attention (Qiu et al. 2025, G1): sigmoid(x W_g) scales each head's output.
    gate_shape, gate_names = {"elementwise": ((h, hd), ("heads", "head_dim")),
                              "headwise": ((h,), ("heads",)), None: ((), ())}[config.attention_gate]
    self.gate = Linear((d,), gate_shape, ("embed",), gate_names, **dense) if config.attention_gate else None
    # TAPE: per-head gain of the attention update of the position features, zero at init.
    self.tape_gain = logical_param(jnp.zeros((h,), jnp.float32), ("heads",)) if config.positional == "tape" else None
    self.config = config
    self.record_sink = False  # set by evaluation to sow the attention-sink measure

  # ---- pieces -------------------------------------------------------------------------
  def _slopes(self) -> jax.Array | None:
    return jnp.asarray(alibi_slopes(self.config.num_heads)) if self.config.positional == "alibi" else None

  def _decode_params(self) -> MaskParams:
    """Mask rules for `cache_attention`: positions are explicit, and whether a cache
    slot holds a key rides on the segment test."""
    c = self.config
    return MaskParams(q_offset=0, kv_len=2**30, causal=True, sliding_window=c.sliding_window,
                      logit_soft_cap=c.logit_soft_cap, scale=c.dim_per_head**-0.5,
                      has_segments=True, has_alibi=c.positional == "alibi")

  def _project(self, x: jax.Array, positions: jax.Array, pe: PositionState | None):
    c = self.config
    q = shard(self.q(x), ("batch", "length", "heads", "head_dim"))
    k = shard(self.k(x), ("batch", "length", "kv_heads", "head_dim"))
    v = shard(self.v(x), ("batch", "length", "kv_heads", "head_dim"))
    if c.positional == "rope":
      q = rope(q, positions, c.rope_theta, c.rope_scaling, c.rope_scaling_factor)
      k = rope(k, positions, c.rope_theta, c.rope_scaling, c.rope_scaling_factor)
    elif c.positional == "tape":
      cos, sin = pe
      q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return q, k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    c = self.config
    if c.attention_impl == "cudnn":
      window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                          implementation="cudnn")
    return flash_attention(
        q, k, v, causal=True, sliding_window=c.sliding_window, logit_soft_cap=c.logit_soft_cap,
        alibi_slopes=self._slopes(), implementation=None if c.attention_impl == "auto" else c.attention_impl,
        batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads"),
    )

  def _record_sink(self, q: jax.Array, k: jax.Array) -> None:
    """Sows the mean attention weight on the first token over heads and queries 1..t-1
    (query 0 sees only the first token, so its weight is 1 whatever the model)."""
    if self.record_sink:
      c = self.config
      weight = attention_to_first_key(q, k, causal=True, sliding_window=c.sliding_window,
                                      logit_soft_cap=c.logit_soft_cap, alibi_slopes=self._slopes())
      self.sow(nnx.Intermediate, "attention_sink", jnp.mean(weight[:, 1:]))

  def _output(self, x: jax.Array, out: jax.Array) -> jax.Array:
    if self.gate is not None:
      gate = jax.nn.sigmoid(self.gate(x).astype(jnp.float32))
      gate = gate if gate.ndim == out.ndim else gate[..., None]
      out = (out.astype(jnp.float32) * gate).astype(out.dtype)
    return self.o(shard(out, ("batch", "length", "heads", "head_dim")))

  def _tape_update(self, pe: PositionState, mixed: jax.Array) -> PositionState:
    """E <- E + g_h · (α E), the attention path of TAPE (Zhu et al. 2025, `adape.py`)."""
    gain = self.tape_gain[...].astype(jnp.float32).reshape(1, 1, -1, 1)
    mixed_cos, mixed_sin = jnp.split(mixed.astype(jnp.float32), 2, axis=-1)
    return pe[0] + gain * mixed_cos, pe[1] + gain * mixed_sin

  def _values(self, v: jax.Array, pe: PositionState | None) -> jax.Array:
    """TAPE attends over [v, cos, sin] so one pass also mixes the position features."""
    if pe is None:
      return v
    return jnp.concatenate([v, pe[0].astype(v.dtype), pe[1].astype(v.dtype)], axis=-1)

  def _split(self, out: jax.Array, pe: PositionState | None):
    if pe is None:
      return out, pe
    hd = self.config.dim_per_head
    return out[..., :hd], self._tape_update(pe, out[..., hd:])

  # ---- the mixer interface ------------------------------------------------------------
  def __call__(self, x: jax.Array, positions: jax.Array, pe: PositionState | None = None):
    """Full-sequence causal attention. Returns y, or (y, pe) for TAPE."""
    q, k, v = self._project(x, positions, pe)
    self._record_sink(q, k)
    out, pe = self._split(self._attend(q, k, self._values(v, pe)), pe)
    y = self._output(x, out)
    return y if pe is None else (y, pe)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    c = self.config
    ring = c.sliding_window is not None and c.sliding_window < max_len
    slots = c.sliding_window if ring else max_len
    dv = 3 * c.dim_per_head if c.positional == "tape" else c.dim_per_head
    return KVCache(
        k=jnp.zeros((batch, slots, c.kv_heads, c.dim_per_head), dtype),
        v=jnp.zeros((batch, slots, c.kv_heads, dv), dtype),
        positions=jnp.full((slots,), -1, jnp.int32) if ring else None,
    )

  def decode(self, x: jax.Array, positions: jax.Array, cache: KVCache,
             pe: PositionState | None = None):
    """The next t tokens at ``positions`` [b, t] (the same for every row) against the
    cache. Returns (y, cache), or (y, cache, pe) for TAPE."""
    t = x.shape[1]
    q, k, v = self._project(x, positions, pe)
    v = self._values(v, pe)
    params = self._decode_params()
    start = positions[0, 0]
    if cache.positions is None:  # slot i holds position i: write, then attend
      k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
      slots = jnp.arange(cache.k.shape[1], dtype=jnp.int32)
      out = cache_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), positions, slots,
                            jnp.ones_like(slots, bool), params, self._slopes())
      cache = KVCache(k=k_all, v=v_all)
    else:  # ring buffer: attend to the window and the new tokens, then keep the newest
      keys = jnp.concatenate([cache.k.astype(q.dtype), k], axis=1)
      values = jnp.concatenate([cache.v.astype(q.dtype), v.astype(q.dtype)], axis=1)
      key_pos = jnp.concatenate([cache.positions, positions[0]])
      out = cache_attention(q, keys, values, positions, key_pos, key_pos >= 0, params, self._slopes())
      window = cache.k.shape[1]
      keep = min(t, window)
      new_pos = positions[0, t - keep:]
      slots = new_pos % window
      cache = KVCache(
          k=cache.k.at[:, slots].set(k[:, t - keep:].astype(cache.k.dtype)),
          v=cache.v.at[:, slots].set(v[:, t - keep:].astype(cache.v.dtype)),
          positions=cache.positions.at[slots].set(new_pos),
      )
    out, pe = self._split(out, pe)
    y = self._output(x, out)
    return (y, cache) if pe is None else (y, cache, pe)
