"""Multi-head attention with grouped-query heads, RoPE, a causal mask and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear
from jaxlab.nn.positional import rope
from jaxlab.nn.registry import register_mixer
from jaxlab.sharding import shard


def dot_product_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    mask: Bool[Array, "b t s"],
) -> Float[Array, "b t h d"]:
  """softmax(q kᵀ / sqrt(d) + mask) v with query head i reading kv head i // (h // kv).

  Grouped heads are a reshape, never a copy of k and v. Scores and softmax are fp32.
  A query whose row of ``mask`` is all False returns zeros.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d**-0.5)
  mask = mask[:, None, None, :, :]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
  return out.reshape(b, t, h, d)


@struct.dataclass
class KVCache:
  """Keys and values of the first ``index`` positions; slots past it are unused."""

  k: Float[Array, "b s kv d"]
  v: Float[Array, "b s kv d"]
  index: Int[Array, ""]


@register_mixer("attention")
class Attention(nnx.Module):
  """Causal self-attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al.
  2023) and rotary positions; projections laid out ``[embed, heads, head_dim]``."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, h, kv, hd = config.d_model, config.num_heads, config.kv_heads, config.dim_per_head
    dense = dict(use_bias=config.attention_bias, init_std=config.init_std, rngs=rngs)
    self.q = Linear((d,), (h, hd), ("embed",), ("heads", "head_dim"), **dense)
    self.k = Linear((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), **dense)
    self.v = Linear((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), **dense)
    self.o = Linear(
        (h, hd), (d,), ("heads", "head_dim"), ("embed",),
        use_bias=config.attention_bias, init_std=config.init_std, rngs=rngs,
    )
    self.positional = config.positional
    self.rope_theta = config.rope_theta

  def _project(self, x_BxLxD: jax.Array, positions_BxL: jax.Array):
    q = shard(self.q(x_BxLxD), ("batch", "length", "heads", "head_dim"))
    k = shard(self.k(x_BxLxD), ("batch", "length", "kv_heads", "head_dim"))
    v = shard(self.v(x_BxLxD), ("batch", "length", "kv_heads", "head_dim"))
    if self.positional == "rope":
      q = rope(q, positions_BxL, self.rope_theta)
      k = rope(k, positions_BxL, self.rope_theta)
    return q, k, v

  def _output(self, out_BxLxHxK: jax.Array) -> jax.Array:
    out_BxLxHxK = shard(out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    return self.o(out_BxLxHxK)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    q, k, v = self._project(x_BxLxD, positions_BxL)
    causal = positions_BxL[:, :, None] >= positions_BxL[:, None, :]
    return self._output(dot_product_attention(q, k, v, causal))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    _, kv, hd = self.k.kernel.shape
    zeros = jnp.zeros((batch, max_len, kv, hd), dtype)
    return KVCache(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32))

  def decode(self, x_BxTxD: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Attends the next T tokens to the cache and to each other, causally."""
    b, t, _ = x_BxTxD.shape
    positions = cache.index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v = self._project(x_BxTxD, positions)
    start = (0, cache.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
    key_positions = jnp.arange(cache.k.shape[1], dtype=jnp.int32)
    mask = positions[:, :, None] >= key_positions[None, None, :]
    out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
    return self._output(out), KVCache(k=k_all, v=v_all, index=cache.index + t)
