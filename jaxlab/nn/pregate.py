"""Read-ME's pre-gating router (Cai et al., NeurIPS 2024; ``cluster_predictor_class`` in
their code): a small causal transformer that reads only the token ids, runs once per
sequence ahead of the backbone, and whose top-1 expert every MoE layer uses
(``moe_router="pregate"``). Because it never sees the backbone's hidden states, the
experts of every queued request are known before the backbone runs.

Built from jaxlab's own blocks: token embedding (``moe_pregate_dim`` wide; Read-ME
initializes it from the first columns of the backbone's embedding), ``moe_pregate_layers``
blocks of causal attention with RoPE and an MLP, a final norm and a linear map to the
experts. Differences from the official module: attention logits are scaled by 1/√d (theirs
by 1, ``attn_normalizer``), the MLP is GELU (theirs SiLU), no biases, and the backbone's
init (normal, ``init_std``) instead of Kaiming-uniform.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.block import Block
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.embed import Embed
from jaxlab.nn.linear import Linear
from jaxlab.nn.norms import make_norm


def router_config(config: ModelConfig) -> ModelConfig:
  """The router's own architecture: dense attention blocks of width ``moe_pregate_dim``."""
  d = config.moe_pregate_dim
  return dataclasses.replace(
      config, d_model=d, num_layers=config.moe_pregate_layers, num_heads=config.moe_pregate_heads,
      num_kv_heads=None, head_dim=None, mlp_dim=d, mlp_activation="gelu", mlp_bias=False, mixers=("attention",),
      ffns=("mlp",), positional="rope", attention_gate=None, sliding_window=None, logit_soft_cap=None,
      attention_bias=False, tie_embeddings=False, remat="none", moe_router="topk")


class PreGatingRouter(nnx.Module):
  """``router(tokens) -> logits [b, t, experts]``; ``choose`` gives the top-1 expert."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    inner = router_config(config)
    self.embed = Embed(config.vocab_size, inner.d_model, init_std=config.init_std, rngs=rngs)
    self.blocks = nnx.List([Block(inner, i, rngs=rngs) for i in range(inner.num_layers)])
    self.final_norm = make_norm(inner)
    self.head = Linear((inner.d_model,), (config.moe_num_experts,), ("embed",), (None,),
                       init_std=config.init_std, rngs=rngs)

  def __call__(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"]) -> Float[Array, "b t e"]:
    x = self.embed(tokens)
    for block in self.blocks:
      x, _ = block(x, positions)
    return self.head(self.final_norm(x)).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list[Any]:
    return [block.mixer.init_cache(batch, max_len, dtype) for block in self.blocks]

  def decode(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], cache: list[Any]):
    x = self.embed(tokens)
    layers = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache, _ = block.decode(x, positions, layer_cache)
      layers.append(layer_cache)
    return self.head(self.final_norm(x)).astype(jnp.float32), layers


def choose(logits: Float[Array, "b t e"]) -> Int[Array, "b t"]:
  """Read-ME's routing: the argmax expert of each token, the same in every layer."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)

