"""Hugging Face Llama interop, checked live against transformers' LlamaForCausalLM."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from jaxlab.interop.hf import export_llama, load_llama
from jaxlab.nn import ModelConfig, Transformer

SHAPES = {
    "gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, rope_theta=10_000.0),
    "mqa_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500.0),
    "mha_headdim_bias": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=24,
                             attention_bias=True, mlp_bias=True, rope_theta=1_000_000.0,
                             rms_norm_eps=1e-5),
}


def hf_model(seed, **shape):
  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=97, **shape)
  model = LlamaForCausalLM(config).eval()
  with torch.no_grad():  # a trained-looking model: non-trivial norms and biases too
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens(seed, shape=(2, 13)):
  return np.random.default_rng(seed).integers(0, 97, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_load_llama_matches_transformers(name, shard_size, tmp_path):
  reference = hf_model(0, **SHAPES[name])
  kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
  reference.save_pretrained(tmp_path, **kwargs)
  if shard_size:
    assert (tmp_path / "model.safetensors.index.json").exists()
  model, config = load_llama(tmp_path)
  assert config.tie_embeddings == SHAPES[name].get("tie_word_embeddings", False)
  t = tokens(1)
  np.testing.assert_array_less(np.abs(np.asarray(model(t)) - hf_logits(reference, t)).max(), 1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_export_llama_loads_in_transformers(tie, tmp_path):
  config = ModelConfig(vocab_size=97, d_model=48, num_layers=2, num_heads=6, num_kv_heads=3,
                       mlp_dim=64, rope_theta=2_000.0, tie_embeddings=tie, norm_eps=1e-6)
  model = Transformer(config, rngs=nnx.Rngs(4))
  export_llama(model, config, tmp_path)
  reference = LlamaForCausalLM.from_pretrained(tmp_path).eval()
  t = tokens(2)
  np.testing.assert_array_less(np.abs(np.asarray(model(t)) - hf_logits(reference, t)).max(), 1e-4)
  reloaded, reloaded_config = load_llama(tmp_path)
  assert reloaded_config == config
  np.testing.assert_allclose(np.asarray(reloaded(t)), np.asarray(model(t)), atol=1e-6)


def test_other_architectures_and_broken_checkpoints_are_named(tmp_path):
  reference = hf_model(0, **SHAPES["gqa"])
  reference.save_pretrained(tmp_path)
  config_path = tmp_path / "config.json"
  hf_config = json.loads(config_path.read_text())

  config_path.write_text(json.dumps({**hf_config, "model_type": "mistral"}))
  with pytest.raises(ValueError, match="model_type='mistral'"):
    load_llama(tmp_path)

  config_path.write_text(json.dumps({**hf_config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}))
  with pytest.raises(ValueError, match="rope_type='llama3'"):
    load_llama(tmp_path)

  config_path.write_text(json.dumps({**hf_config, "intermediate_size": 128}))
  with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
    load_llama(tmp_path)


def test_only_llama_shaped_models_export(tmp_path):
  config = ModelConfig(vocab_size=50, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, norm="layernorm")
  with pytest.raises(ValueError, match="model.norm='layernorm'"):
    export_llama(Transformer(config, rngs=nnx.Rngs(0)), config, tmp_path)


def test_tape_from_a_loaded_llama_starts_as_the_llama(tmp_path):
  """TAPE fine-tuning starts from a pretrained RoPE model and reproduces it exactly."""
  from jaxlab.nn.transformer import convert_positional

  reference = hf_model(0, **{**SHAPES["gqa"], "num_key_value_heads": 8})
  reference.save_pretrained(tmp_path)
  model, _ = load_llama(tmp_path)
  tape = convert_positional(model, "tape", rngs=nnx.Rngs(0))
  t = tokens(5)
  np.testing.assert_array_less(np.abs(np.asarray(tape(t)) - hf_logits(reference, t)).max(), 1e-4)
