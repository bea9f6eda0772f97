"""Model FLOPs per token and the devices' peak FLOP/s, for model FLOPs utilization."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxlab.nn import ModelConfig

# Dense bf16 peak per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12,
    "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12, "a10g": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
}


def active_expert_fraction(config: ModelConfig) -> float:
  """The fraction of a MoE layer's routed experts a token uses: k / E for the
  token-choice routers; capacity_factor · k / E (the mean) for expert choice."""
  c = config
  per_token = c.moe_top_k * (c.moe_capacity_factor if c.moe_router == "expert_choice" else 1.0)
  return min(1.0, per_token / c.moe_num_experts)


def active_block_fraction(config: ModelConfig) -> float:
  """The fraction of a block mixture's expert blocks a sequence uses: k / E."""
  return config.block_top_k / config.block_experts if config.block_experts else 1.0


_BLOCK_EXPERT = re.compile(r"\['blocks'\]\[\d+\]\['experts'\]")


def matmul_params(params: Any, tie_embeddings: bool, expert_fraction: float = 1.0,
                  block_fraction: float = 1.0) -> float:
  """Parameters a token uses in matrix multiplies: every matrix except a lookup-only
  (untied) input embedding, routed experts (under ``ffn/experts``) counted by the
  fraction of them a token uses and expert blocks (``blocks/i/experts``) by the
  fraction a sequence uses; routers and shared experts count whole."""
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = jax.tree_util.keystr(path)
    if leaf.ndim < 2 or ("embed" in keys and "table" in keys and not tie_embeddings):
      continue
    fraction = expert_fraction if "['ffn']['experts']" in keys else 1.0
    if _BLOCK_EXPERT.match(keys):
      fraction *= block_fraction
    total += fraction * math.prod(leaf.shape)
  return total


def mixer_forward_flops(config: ModelConfig, mixer: str, seq_len: int) -> float:
  """Forward FLOPs per token of a mixer beyond its projections: causal attention
  4 · heads · head_dim · (T + 1)/2 (PaLM appendix B); the selective scan 9 · inner · N
  (Gu & Dao 2023, §3.3); SSD and GLA in chunks of Q: the intra-chunk scores and
  outputs 2 · Q · (N + P) per head plus the state terms 4 · N · P per head (Dao & Gu 2024,
  §6); S4D's FFT convolution ~ 3 · 5 · d · log2(2T) for the three transforms."""
  if mixer == "attention":
    return 4 * config.num_heads * config.dim_per_head * (seq_len + 1) / 2
  if mixer == "mamba":
    return 9 * config.ssm_inner * config.state_size("mamba")
  q = min(config.ssm_chunk, seq_len)
  if mixer == "mamba2":
    n, p = config.state_size("mamba2"), config.ssm_head_dim
    return config.ssm_heads * (2 * q * (n + p) + 4 * n * p)
  if mixer == "gla":
    h = config.gla_num_heads
    dk, dv = config.gla_key_dim // h, config.gla_value_dim // h
    return h * (2 * q * (dk + dv) + 4 * dk * dv)
  if mixer == "s4d":
    return 15 * config.d_model * math.log2(2 * seq_len)
  return 0.0


def train_flops_per_token(params: Any, config: ModelConfig, seq_len: int) -> float:
  """6 · N_active + 3 × each layer's mixer FLOPs (forward + backward; Kaplan et al.
  2020, PaLM appendix B)."""
  mixers = sum(mixer_forward_flops(config, config.mixer_of(i), seq_len)
               * (config.block_top_k if config.is_block_mixture(i) else 1) for i in range(config.num_layers))
  active = matmul_params(params, config.tie_embeddings, active_expert_fraction(config), active_block_fraction(config))
  return 6 * active + 3 * mixers


def measure_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted fp32 matmul on the first local device (best of ``repeats``)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops(devices: list[jax.Device] | None = None) -> float:
  """Peak FLOP/s of all devices in the run. Accelerators: the data-sheet figure per
  chip; CPUs (and unknown chips): a matmul measured at start-up on this host, times
  the number of hosts (fake CPU devices share the host's cores)."""
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind.lower()
  if devices[0].platform != "cpu":
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
      if name in kind:
        return PEAK_BF16_FLOPS[name] * len(devices)
  hosts = len({d.process_index for d in devices})
  return measure_matmul_flops() * hosts
