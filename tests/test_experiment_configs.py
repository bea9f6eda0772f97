"""Every named experiment config builds a valid model and data source at every size."""

from pathlib import Path

import numpy as np
import pytest

from jaxlab.data import make_sources
from jaxlab.nn import ModelConfig
from jaxlab.train import load_config_module

RECALL = load_config_module(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "ssm_recall.py")


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
