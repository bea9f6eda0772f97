"""Flax NNX modules. Importing this package registers every mixer and FFN."""

from jaxlab.nn.attention import Attention, KVCache, dot_product_attention
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.mlp import MLP
from jaxlab.nn.registry import FFNS, MIXERS, register_ffn, register_mixer
from jaxlab.nn.transformer import Block, Transformer, generate

__all__ = [
    "Attention", "Block", "FFNS", "KVCache", "MIXERS", "MLP", "ModelConfig", "Transformer",
    "dot_product_attention", "generate", "register_ffn", "register_mixer",
]
