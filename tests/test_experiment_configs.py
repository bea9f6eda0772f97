"""Every named experiment config builds a valid model and data source at every size."""

import importlib.util
from pathlib import Path

import pytest

from jaxlab.data import make_sources
from jaxlab.nn import ModelConfig

_SPEC = importlib.util.spec_from_file_location(
    "ssm_recall", Path(__file__).resolve().parents[1] / "experiments" / "configs" / "ssm_recall.py")
RECALL = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(RECALL)


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
