"""Hugging Face MoE interop (Mixtral, Qwen2-MoE), checked live against transformers."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from jaxlab.interop.hf import export_mixtral, export_qwen2_moe, load_mixtral, load_qwen2_moe
from jaxlab.nn import ModelConfig, Transformer

VOCAB = 97
# initializer_range 0.15 (not 0.02) so that every expert moves the logits far beyond the
# tolerance: with tiny weights a swapped gate/up would hide under atol.
MIXTRAL = {
    "gqa_top2_e4": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "mqa_top1_e8_tied_headdim": dict(hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                     num_local_experts=8, num_experts_per_tok=1, tie_word_embeddings=True,
                                     rope_theta=500.0),
    "top2_e8_window": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=5),
}
QWEN2_MOE = {
    # every layer MoE, gates not renormalized (Qwen1.5-MoE's norm_topk_prob=False), q/k/v biases
    "gqa_top2_e4_unnormalized": dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                                     shared_expert_intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                     num_experts_per_tok=2, norm_topk_prob=False),
    # dense layer 0, MoE layer 1 (ffns ("mlp", "moe")), top-1 of 8, renormalized
    "sparse_step2_top1_e8": dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, num_experts=8, num_experts_per_tok=1, norm_topk_prob=True,
                                 decoder_sparse_step=2),
    # MoE layer 0, dense layer 1 (mlp_only_layers), no biases, sliding window in every layer
    "mlp_only_window": dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                            qkv_bias=False, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                            layer_types=["sliding_attention"] * 2),
}
FAMILIES = {
    "mixtral": (MIXTRAL, MixtralConfig, MixtralForCausalLM, load_mixtral, export_mixtral),
    "qwen2_moe": (QWEN2_MOE, Qwen2MoeConfig, Qwen2MoeForCausalLM, load_qwen2_moe, export_qwen2_moe),
}
# (family, shape, save_pretrained kwargs): per-expert files, sharded, and transformers 5's fused names
CASES = [
    ("mixtral", "gqa_top2_e4", {}),
    ("mixtral", "gqa_top2_e4", {"save_original_format": False}),
    ("mixtral", "mqa_top1_e8_tied_headdim", {"max_shard_size": "20KB"}),
    ("mixtral", "top2_e8_window", {}),
    ("qwen2_moe", "gqa_top2_e4_unnormalized", {}),
    ("qwen2_moe", "sparse_step2_top1_e8", {"max_shard_size": "20KB"}),
    ("qwen2_moe", "mlp_only_window", {"save_original_format": False}),
]
EXPECTED_FFNS = {"gqa_top2_e4_unnormalized": ("moe",), "sparse_step2_top1_e8": ("mlp", "moe"),
                 "mlp_only_window": ("moe", "mlp")}


def hf_model(family, name, seed=0):
  shapes, config_cls, model_cls, _, _ = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(vocab_size=VOCAB, initializer_range=0.15, **shapes[name])).eval()
  with torch.no_grad():  # a trained-looking model: non-trivial norms and biases too
    for param_name, p in model.named_parameters():
      if param_name.endswith("bias") or "norm" in param_name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens(seed, shape=(2, 12)):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


# Jitted: a compile is a few times faster than the first eager call of an MoE model.
forward = nnx.jit(lambda model, t: model(t))


def max_diff(model, reference, t):
  return np.abs(np.asarray(forward(model, t)) - hf_logits(reference, t)).max()


@pytest.mark.parametrize("family,name,save", CASES, ids=[f"{f}-{n}-{'-'.join(s) or 'plain'}" for f, n, s in CASES])
def test_load_matches_transformers(family, name, save, tmp_path):
  reference = hf_model(family, name)
  reference.save_pretrained(tmp_path, **save)
  if "max_shard_size" in save:
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
  model, config = FAMILIES[family][3](tmp_path)
  shape = FAMILIES[family][0][name]
  assert (config.moe_num_experts, config.moe_top_k) == (shape.get("num_local_experts", shape.get("num_experts")),
                                                         shape["num_experts_per_tok"])
  assert config.sliding_window == shape.get("sliding_window")
  if family == "qwen2_moe":
    assert config.ffns == EXPECTED_FFNS[name]
    assert config.moe_shared_experts * config.expert_dim == shape["shared_expert_intermediate_size"]
  np.testing.assert_array_less(max_diff(model, reference, tokens(1)), 1e-4)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family,name", [("mixtral", "gqa_top2_e4"), ("qwen2_moe", "gqa_top2_e4_unnormalized")])
def test_load_export_load_round_trip(family, name, tmp_path):
  _, _, model_cls, load, export = FAMILIES[family]
  reference = hf_model(family, name, seed=3)
  reference.save_pretrained(tmp_path / "hf")
  model, config = load(tmp_path / "hf")
  export(model, config, tmp_path / "jaxlab", max_shard_size="20KB")
  assert (tmp_path / "jaxlab" / "model.safetensors.index.json").exists()
  reloaded, reloaded_config = load(tmp_path / "jaxlab")
  assert reloaded_config == config
  chex.assert_trees_all_equal(_params(reloaded), _params(model))
  t = tokens(2)
  exported = model_cls.from_pretrained(tmp_path / "jaxlab").eval()
  np.testing.assert_array_less(np.abs(hf_logits(exported, t) - hf_logits(reference, t)).max(), 1e-6)


JAXLAB_MOE = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40,
                  moe_expert_dim=16, moe_num_experts=4, moe_top_k=2, init_std=0.15, norm_eps=1e-6,
                  rope_theta=2_000.0)


def jaxlab_model(config, seed):
  """A trained-looking jaxlab model (norms near 1, nonzero biases except o's, which Qwen2
  lacks), drawn with numpy: faster than the model's own initializers on CPU."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(state):
    noise = rng.standard_normal(variable.shape).astype(np.float32)
    if path[-1] == "scale":
      variable.set_value(jnp.asarray(1 + 0.1 * noise))
    elif path[-1] == "bias":
      variable.set_value(jnp.asarray(0 * noise if path[-2] == "o" else 0.1 * noise))
    else:
      variable.set_value(jnp.asarray(config.init_std * noise))
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("family,fields", [
    ("mixtral", dict(ffns=("moe",), tie_embeddings=True)),
    # layer 0 MoE, layer 1 dense: no decoder_sparse_step gives that, so mlp_only_layers=[1]
    ("qwen2_moe", dict(ffns=("moe", "mlp"), moe_shared_experts=2, moe_shared_gate=True, moe_renormalize=False,
                       attention_bias=True)),
])
def test_export_of_a_jaxlab_model_loads_in_transformers(family, fields, tmp_path):
  _, _, model_cls, load, export = FAMILIES[family]
  config = ModelConfig(**JAXLAB_MOE, **fields)
  model = jaxlab_model(config, seed=4)
  export(model, config, tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  if family == "qwen2_moe":
    assert (hf_config["decoder_sparse_step"], hf_config["mlp_only_layers"]) == (1, [1])
  reference = model_cls.from_pretrained(tmp_path).eval()
  np.testing.assert_array_less(max_diff(model, reference, tokens(2)), 1e-4)
  _, reloaded_config = load(tmp_path)
  normalized = dict(moe_z_loss_weight=0.0)  # transformers has no router z-loss
  if family == "mixtral":  # Mixtral's one width, intermediate_size, is the experts'
    normalized.update(mlp_dim=config.expert_dim, moe_expert_dim=None)
  assert reloaded_config == dataclasses.replace(config, **normalized)


def _edit_config(path, **fields):
  config_path = path / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **fields}))


def test_unsupported_checkpoints_are_named(tmp_path):
  hf_model("qwen2_moe", "gqa_top2_e4_unnormalized").save_pretrained(tmp_path / "qwen")
  hf_model("mixtral", "gqa_top2_e4").save_pretrained(tmp_path / "mixtral")
  with pytest.raises(ValueError, match="model_type='qwen2_moe'; load_mixtral reads only 'mixtral'"):
    load_mixtral(tmp_path / "qwen")

  _edit_config(tmp_path / "qwen", use_sliding_window=True, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"])
  with pytest.raises(ValueError, match="use_sliding_window=True"):
    load_qwen2_moe(tmp_path / "qwen")
  _edit_config(tmp_path / "qwen", use_sliding_window=False, layer_types=None, shared_expert_intermediate_size=24)
  with pytest.raises(ValueError, match="shared_expert_intermediate_size=24 is not a positive multiple"):
    load_qwen2_moe(tmp_path / "qwen")

  _edit_config(tmp_path / "mixtral", num_local_experts=5)
  with pytest.raises(ValueError, match=r"block_sparse_moe\.gate\.weight' has shape \(4, 32\), but config.json "
                     r"implies \(5, 32\)"):
    load_mixtral(tmp_path / "mixtral")
  _edit_config(tmp_path / "mixtral", num_local_experts=4)
  weights = tmp_path / "mixtral" / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if "experts.3.w3" not in k}, weights)
  with pytest.raises(KeyError, match=r"block_sparse_moe\.experts\.3\.w3\.weight"):
    load_mixtral(tmp_path / "mixtral")
  _edit_config(tmp_path / "mixtral", num_local_experts=4, rope_parameters={"rope_type": "yarn", "rope_theta": 1.0})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    load_mixtral(tmp_path / "mixtral")


def test_unsupported_models_do_not_export(tmp_path):
  base = dict(JAXLAB_MOE, num_layers=1)

  def model_of(**fields):
    config = ModelConfig(**base, **fields)
    return jaxlab_model(config, seed=0), config

  with pytest.raises(ValueError, match="a shared MLP .* wide .*Mixtral has no shared experts"):
    export_mixtral(*model_of(ffns=("moe",), moe_shared_experts=1), tmp_path)
  with pytest.raises(ValueError, match="model.moe_router='sigmoid'"):
    export_mixtral(*model_of(ffns=("moe",), moe_router="sigmoid"), tmp_path)
  with pytest.raises(ValueError, match="model.moe_renormalize=False"):
    export_mixtral(*model_of(ffns=("moe",), moe_renormalize=False), tmp_path)
  with pytest.raises(ValueError, match="moe_shared_gate=False"):
    export_qwen2_moe(*model_of(ffns=("moe",), moe_shared_experts=1), tmp_path)
  model, config = model_of(ffns=("moe",), moe_shared_experts=1, moe_shared_gate=True, attention_bias=True)
  model.blocks[0].mixer.o.bias[...] += 1.0
  with pytest.raises(ValueError, match="blocks/0/mixer/o/bias is nonzero"):
    export_qwen2_moe(model, config, tmp_path)
  assert not any(tmp_path.iterdir())
