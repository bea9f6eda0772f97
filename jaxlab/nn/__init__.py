"""Flax NNX modules. Importing this package registers every mixer and FFN."""

from jaxlab.nn.attention import Attention, KVCache, cache_attention
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear_attention import GatedLinearAttention
from jaxlab.nn.lora import LoRA, merge_lora
from jaxlab.nn.mlp import MLP
from jaxlab.nn.registry import FFNS, MIXERS, register_ffn, register_mixer
from jaxlab.nn.ssm import S4D, Mamba, Mamba2, SSMCache
from jaxlab.nn.block import Block
from jaxlab.nn.transformer import Cache, Transformer, generate, parameter_count

__all__ = [
    "Attention", "Block", "Cache", "FFNS", "GatedLinearAttention", "KVCache", "LoRA", "MIXERS", "MLP", "Mamba",
    "Mamba2", "ModelConfig", "S4D", "SSMCache", "Transformer", "cache_attention", "generate", "merge_lora",
    "parameter_count", "register_ffn", "register_mixer",
]
