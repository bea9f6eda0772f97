"""The MoE FFN case that moe.py (CPU) and moe_gpu.py (GPU) time: 8192 tokens, d_model 512,
8 experts of width 1024, top-2, against a dense SwiGLU FFN of the same active FLOPs."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxlab.nn import ModelConfig
from jaxlab.nn.mlp import MLP
from jaxlab.nn.moe import MoE

SHAPE = dict(batch=8, seq_len=1024, d_model=512, expert_dim=1024, experts=8, top_k=2)
CONFIG = ModelConfig(d_model=SHAPE["d_model"], num_heads=8, ffns=("moe",), moe_num_experts=SHAPE["experts"],
                     moe_top_k=SHAPE["top_k"], moe_expert_dim=SHAPE["expert_dim"],
                     mlp_dim=SHAPE["top_k"] * SHAPE["expert_dim"])
DENSE = "dense SwiGLU (equal active FLOPs)"


def make_layer(overrides: dict | None) -> nnx.Module:
  """The dense FFN for None, else the MoE layer with ``overrides`` of its config."""
  if overrides is None:
    return MLP(CONFIG, layer=0, rngs=nnx.Rngs(0))
  return MoE(dataclasses.replace(CONFIG, **overrides), layer=0, rngs=nnx.Rngs(0))


def inputs() -> jax.Array:
  return jax.random.normal(jax.random.key(1), (SHAPE["batch"], SHAPE["seq_len"], SHAPE["d_model"]))
