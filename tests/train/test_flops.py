"""FLOP counts for MFU."""

import math

import jax
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train.flops import matmul_params, peak_flops, train_flops_per_token


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_by_hand(tie):
  config = ModelConfig(vocab_size=100, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, tie_embeddings=tie)
  params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  d, f, kv_dim = 32, 64, 2 * 8
  per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * f  # q, k, v, o, gate/up/down
  head = 100 * d  # the output projection (the tied table, or lm_head)
  assert matmul_params(params, tie) == 3 * per_layer + head
  seq = 128
  attention = 3 * 4 * 4 * 8 * (seq + 1) / 2  # fwd+bwd x (QK + AV) x heads x head_dim x causal mean
  assert train_flops_per_token(params, config, seq) == pytest.approx(
      6 * (3 * per_layer + head) + 3 * attention)


def test_recurrent_mixers_add_their_scan_flops():
  """Mamba: 9 · inner · N per layer (Gu & Dao 2023, §3.3); GLA: 2Q(dk + dv) + 4 dk dv per head."""
  fields = dict(vocab_size=100, d_model=32, num_layers=2, ffns=("none",), ssm_state=16, ssm_chunk=16)
  for mixer, scan in (("mamba", 9 * 64 * 16), ("gla", 4 * (2 * 16 * (4 + 8) + 4 * 4 * 8))):
    config = ModelConfig(**fields, mixers=(mixer,), num_heads=4)
    params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    assert train_flops_per_token(params, config, 128) == pytest.approx(
        6 * matmul_params(params, False) + 3 * 2 * scan)


@pytest.mark.parametrize("router, per_token", [("topk", 2), ("expert_choice", 2 * 1.5)])
def test_moe_counts_only_the_active_experts(router, per_token):
  """k routed experts (expert choice: capacity_factor · k on average), the shared expert
  and the router per token; the dense layers whole."""
  config = ModelConfig(vocab_size=100, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, ffns=("mlp", "moe"),
                       moe_num_experts=8, moe_top_k=2, moe_expert_dim=16, moe_shared_experts=1,
                       moe_router=router, moe_capacity_factor=1.5)
  params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  d = 32
  attention = 4 * d * d
  dense_ffn, expert, shared, router_params = 3 * d * 64, 3 * d * 16, 3 * d * 16, d * 8
  want = 2 * attention + dense_ffn + per_token * expert + shared + router_params + 100 * d
  assert matmul_params(params, False, per_token / 8) == pytest.approx(want)
  attention_scores = 4 * 4 * 8 * (1 + 1) / 2  # per layer at t = 1: 4 · heads · head_dim · (t + 1) / 2
  assert train_flops_per_token(params, config, 1) == pytest.approx(6 * want + 3 * 2 * attention_scores)


def test_block_mixture_counts_the_chosen_blocks():
  """A sequence runs k of the E blocks of each mixture layer (and their mixers' scores);
  the single blocks and the routers count whole."""
  config = ModelConfig(vocab_size=100, d_model=32, num_layers=3, num_heads=4, mlp_dim=64, block_experts=3,
                       block_top_k=2, block_dense_layers=1)
  params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
  d = 32
  block = 4 * d * d + 3 * d * 64
  want = block + 2 * (2 * block + d * 3) + 100 * d
  attention_scores = 4 * 4 * 8 * (1 + 1) / 2
  assert train_flops_per_token(params, config, 1) == pytest.approx(6 * want + 3 * (1 + 2 * 2) * attention_scores)


def test_cpu_peak_is_measured_and_plausible():
  peak = peak_flops(jax.devices()[:1])
  assert 1e8 < peak < 1e14 and math.isfinite(peak)
