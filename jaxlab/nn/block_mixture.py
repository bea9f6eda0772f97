"""Whole blocks as experts: Model-GLUE's block-level and model-level mixtures.

A block-mixture layer holds E complete residual blocks (`jaxlab.nn.block.Block`, e.g.
the same layer of E source models). A router reads one vector per *sequence*, the
layer's residual input at the first token or averaged over the sequence, and the
layer's output is the gate-weighted sum of the chosen blocks' outputs (Model-GLUE's
``MixtralBlockLevelSparseDecoderLayer``)::

    p = softmax(pool(x) W),   (w, S) = top_k(p),   w <- w / Σ w,
    y = Σ_{e ∈ S} w_e · block_e(x)          (each block_e(x) includes its residual)

so with the weights summing to 1, ``y = x + Σ w_e Δ_e`` and a router that always picks
``e`` gives block ``e`` exactly. At the block level every mixture layer has its own
router; at the model level (``block_router="model"``) one router at the first mixture
layer decides for all of them (``MixtralModelLevelHybrid``).

Pooling: ``first_token`` reads position 0, which a causal model computes from the
first token alone, so the model stays causal and decodes (the route is chosen when the
prompt is prefilled and kept in the cache). ``mean`` is the official code's default
but reads every position, so each position's logits depend on later tokens: its loss
is not a causal LM loss, and it cannot decode.

Every expert block runs on every sequence and the unchosen outputs get weight 0 (the
official code loops over experts and gathers their sequences); a mixture of a few
source models costs E blocks per mixture layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from jaxlab.nn.block import Block
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import logical_param
from jaxlab.nn.reports import Metric, report
from jaxlab.sharding import shard


@struct.dataclass
class BlockMixtureCache:
  """A mixture layer's decoding state: each sequence's gate weights over the expert
  blocks (chosen at prefill), and each expert block's mixer cache."""

  routes: Float[Array, "b e"]
  experts: list[Any]


class SequenceRouter(nnx.Module):
  """Gate weights [b, E] from the pooled residual stream: softmax over E, top-k, the
  chosen renormalized to sum to 1, the rest 0."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, e = config.d_model, config.block_experts
    self.kernel = logical_param(jax.random.normal(rngs.params(), (d, e), jnp.float32) * config.init_std,
                                ("embed", None))
    self.config = config

  def pool(self, x: Float[Array, "b l d"]) -> Float[Array, "b d"]:
    x = x.astype(jnp.float32)
    return x[:, 0] if self.config.block_pooler == "first_token" else jnp.mean(x, axis=1)

  def __call__(self, x: Float[Array, "b l d"], positions: Int[Array, "b l"],
               cached: Float[Array, "b e"] | None = None) -> Float[Array, "b e"]:
    """The routes of ``x``; when decoding (``cached`` given) those in the cache, unless
    this call starts the sequence (position 0)."""
    probs = jax.nn.softmax(self.pool(x) @ self.kernel[...], axis=-1)
    top, chosen = jax.lax.top_k(probs, self.config.block_top_k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    routes = jnp.sum(jax.nn.one_hot(chosen, probs.shape[-1], dtype=jnp.float32) * top[..., None], axis=1)
    report(self, Metric, "expert_load", jnp.sum(routes > 0, axis=0).astype(jnp.float32) / self.config.block_top_k)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)
    report(self, Metric, "router_entropy", jnp.sum(entropy))
    if cached is None:
      return routes
    return jnp.where(positions[:, :1] == 0, routes, cached)


class BlockMixture(nnx.Module):
  """``block_experts`` blocks of layer ``layer`` and, at the block level, their router.
  At the model level the Transformer's router passes ``routes``."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.experts = nnx.List([Block(config, layer, rngs=rngs) for _ in range(config.block_experts)])
    self.router = SequenceRouter(config, rngs=rngs) if config.block_router == "layer" else None

  def _combine(self, routes: Float[Array, "b e"], outputs: list[jax.Array]) -> jax.Array:
    y = sum(routes[:, e, None, None].astype(out.dtype) * out for e, out in enumerate(outputs))
    return shard(y, ("batch", "length", "embed"))

  def __call__(self, x: Float[Array, "b l d"], positions: Int[Array, "b l"], pe: None = None, experts: None = None,
               routes: Float[Array, "b e"] | None = None) -> tuple[Float[Array, "b l d"], None]:
    if routes is None:
      routes = self.router(x, positions)
    outputs = [block(x, positions)[0] for block in self.experts]
    return self._combine(routes, outputs), None

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> BlockMixtureCache:
    return BlockMixtureCache(routes=jnp.zeros((batch, len(self.experts)), jnp.float32),
                             experts=[block.init_cache(batch, max_len, dtype) for block in self.experts])

  def decode(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], cache: BlockMixtureCache, pe: None = None,
             experts: None = None,
             routes: Float[Array, "b e"] | None = None) -> tuple[Float[Array, "b t d"], BlockMixtureCache, None]:
    if routes is None:
      routes = self.router(x, positions, cache.routes)
    outputs, caches = [], []
    for block, block_cache in zip(self.experts, cache.experts):
      out, block_cache, _ = block.decode(x, positions, block_cache)
      outputs.append(out)
      caches.append(block_cache)
    return self._combine(routes, outputs), BlockMixtureCache(routes=routes, experts=caches), None


def make_block(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> Block | BlockMixture:
  """Layer ``layer`` of the model: a block, or a mixture of blocks."""
  return BlockMixture(config, layer, rngs=rngs) if config.is_block_mixture(layer) else Block(config, layer, rngs=rngs)
