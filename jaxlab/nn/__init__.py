"""Flax NNX modules. Importing this package registers every mixer and FFN."""

from jaxlab.nn.attention import Attention, KVCache, cache_attention
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.mlp import MLP
from jaxlab.nn.registry import FFNS, MIXERS, register_ffn, register_mixer
from jaxlab.nn.transformer import Block, Cache, Transformer, generate

__all__ = [
    "Attention", "Block", "Cache", "FFNS", "KVCache", "MIXERS", "MLP", "ModelConfig", "Transformer",
    "cache_attention", "generate", "register_ffn", "register_mixer",
]
