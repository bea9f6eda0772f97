"""Every named experiment config builds a valid model and data source at every size."""

from pathlib import Path

import numpy as np
import pytest

from jaxlab.data import Addition, make_sources
from jaxlab.nn import ModelConfig
from jaxlab.train import load_config_module

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
RECALL = load_config_module(CONFIGS / "ssm_recall.py")
TAPE = load_config_module(CONFIGS / "tape_arithmetic.py")
GATED = load_config_module(CONFIGS / "gated_attention.py")


@pytest.mark.parametrize("size", sorted(RECALL.SIZES))
@pytest.mark.parametrize("model", sorted(RECALL.MODELS))
def test_ssm_recall_configs(model, size):
  config = RECALL.get_config(f"{model},4,{size}")
  model_config = ModelConfig.from_dict(config.model)
  assert model_config.num_layers == 4 and model_config.ffns == ("none",)
  sources = make_sources(config.data, seed=0)
  record = sources.train[0]
  assert record["inputs"].shape == (config.data.seq_len,)
  assert record["weights"].sum() == config.data.mqar.num_kv_pairs
  assert sources.vocab_size == model_config.vocab_size


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no experiment config at .*nope.py"):
    load_config_module(tmp_path / "nope.py")


def test_ssm_recall_zero_bias_starts_every_step_size_at_log_2():
  """SSM-Bottleneck's runs zero dt_proj.bias: Δ = softplus(0) = log 2 in every channel."""
  from flax import nnx

  from jaxlab.nn import Transformer

  config = ModelConfig.from_dict(RECALL.get_config("mamba_both,2,cpu,zero_bias").model)
  model = Transformer(config, rngs=nnx.Rngs(0))
  for block in model.blocks:
    np.testing.assert_array_equal(np.asarray(block.mixer.dt_bias[...]), 0.0)
  default = Transformer(ModelConfig.from_dict(RECALL.get_config("mamba_both,2").model), rngs=nnx.Rngs(0))
  assert np.all(np.asarray(default.blocks[0].mixer.dt_bias[...]) < -2)  # Δ <= 0.1


@pytest.mark.parametrize("size", sorted(TAPE.SIZES))
@pytest.mark.parametrize("protocol", sorted(TAPE.PROTOCOLS))
def test_tape_arithmetic_configs(protocol, size):
  """The Abacus protocol puts Abacus on the digit tokens of 1-5 digit problems; the plain
  one has none and 1-8 digits; every problem fits the sequence."""
  config = TAPE.get_config(f"tape,{size},{protocol}")
  model_config = ModelConfig.from_dict(config.model)
  sources = make_sources(config.data, seed=0)
  assert model_config.abacus == (protocol == "abacus") and sources.vocab_size <= model_config.vocab_size
  assert config.data.addition.max_digits == (5 if protocol == "abacus" else 8)
  assert all((sources.train[i]["targets"] == Addition.EOS).any() for i in range(200))  # whole answers fit
  assert model_config.abacus_digit_tokens == (0, 9)  # Addition writes digit d as token d


@pytest.mark.parametrize("size", sorted(GATED.SIZES))
@pytest.mark.parametrize("gate", sorted(GATED.GATES))
def test_gated_attention_configs(gate, size):
  config = GATED.get_config(f"{gate},{size}")
  model_config = ModelConfig.from_dict(config.model)
  assert model_config.attention_gate == GATED.GATES[gate] and model_config.mixers == ("attention",)
  assert make_sources(config.data, seed=0).vocab_size <= model_config.vocab_size
