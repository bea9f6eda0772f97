"""Hugging Face Mamba and Mamba-2 interop, checked live against transformers' pure-PyTorch
("slow") path on CPU: no mamba_ssm / causal_conv1d / hub kernels are installed."""

import importlib.util
import json

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from jaxlab.interop.hf import MAMBA, MAMBA2, config_from_hf, export_mamba, export_mamba2, load_mamba, load_mamba2
from jaxlab.nn import ModelConfig, Transformer, generate

VOCAB = 97
MAMBA_SHAPES = {
    # tied (MambaConfig's default), N = 4, explicit dt rank 2, K = 4
    "tied_n4_rank2": dict(hidden_size=16, num_hidden_layers=2, state_size=4, time_step_rank=2),
    # untied, N = 8, rank 3, K = 3, in/out projection biases (use_bias), another eps
    "untied_n8_k3_bias": dict(hidden_size=24, num_hidden_layers=2, state_size=8, time_step_rank=3, conv_kernel=3,
                              use_bias=True, tie_word_embeddings=False, layer_norm_epsilon=1e-6),
    # no conv bias, "auto" rank (ceil(32 / 16) = 2), expand 3, K = 2
    "no_conv_bias_expand3": dict(hidden_size=32, num_hidden_layers=1, state_size=16, expand=3, conv_kernel=2,
                                 use_conv_bias=False),
}
MAMBA2_SHAPES = {
    # 4 heads of 8 in 2 groups, chunk 4 (sequences of 11 and 13 are not multiples)
    "h4_g2_chunk4": dict(hidden_size=16, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=8, n_groups=2,
                         chunk_size=4),
    # expand 1, 2 heads in one group, tied, K = 3, Mamba2Config's chunk (256)
    "h2_g1_tied_k3": dict(hidden_size=16, num_hidden_layers=2, state_size=8, expand=1, num_heads=2, head_dim=8,
                          n_groups=1, conv_kernel=3, tie_word_embeddings=True),
    # 8 heads of 4 in 4 groups, chunk 5, use_bias, no conv bias, another eps
    "h8_g4_bias_no_conv_bias": dict(hidden_size=16, num_hidden_layers=1, state_size=6, num_heads=8, head_dim=4,
                                    n_groups=4, chunk_size=5, use_bias=True, use_conv_bias=False,
                                    layer_norm_epsilon=1e-6),
}
FAMILIES = {
    "mamba": (MAMBA_SHAPES, MambaConfig, MambaForCausalLM, load_mamba, export_mamba),
    "mamba2": (MAMBA2_SHAPES, Mamba2Config, Mamba2ForCausalLM, load_mamba2, export_mamba2),
}
CASES = [(family, name) for family in FAMILIES for name in FAMILIES[family][0]]


def test_transformers_runs_its_torch_path():
  """The reference is transformers' own PyTorch code: with none of these importable, its
  kernel wrappers fall back to it (and the models below live on the CPU). Hub kernels
  (the `kernels` package, a transformers requirement) replace it only when a model asks
  for them, which `hf_model` checks none does."""
  for package in ("mamba_ssm", "causal_conv1d", "mambapy"):
    assert importlib.util.find_spec(package) is None, f"{package} would replace transformers' torch path"


def hf_model(family, name, seed=0):
  shapes, config_cls, model_cls, _, _ = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(vocab_size=VOCAB, **shapes[name])).eval()
  with torch.no_grad():  # a trained-looking model: every norm, bias, D, A_log and dt bias distinct
    for param_name, p in model.named_parameters():
      if param_name.endswith(("bias", ".D", "A_log")) or "norm" in param_name:
        p.add_(0.2 * torch.randn_like(p))
  assert next(model.parameters()).device.type == "cpu" and not model.use_kernels
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens(seed, shape=(2, 11)):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


forward = nnx.jit(lambda model, t: model(t))


def max_diff(model, reference, t):
  return np.abs(np.asarray(forward(model, t)) - hf_logits(reference, t)).max()


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_load_matches_transformers(family, name, tmp_path):
  shapes, config_cls, _, load, _ = FAMILIES[family]
  reference = hf_model(family, name)
  reference.save_pretrained(tmp_path)
  model, config = load(tmp_path)
  hf = reference.config
  assert (config.mixers, config.ffns) == ((family,), ("none",))
  assert (config.tie_embeddings, config.ssm_state, config.ssm_conv, config.ssm_bias, config.norm_eps) == (
      hf.tie_word_embeddings, hf.state_size, hf.conv_kernel, hf.use_bias, hf.layer_norm_epsilon)
  if family == "mamba":
    assert config.dt_rank == hf.time_step_rank
  else:
    assert (config.ssm_heads, config.ssm_head_dim, config.ssm_groups, config.ssm_chunk) == (
        hf.num_heads, hf.head_dim, hf.n_groups, hf.chunk_size)
  for t in (tokens(1, (2, 11)), tokens(2, (1, 13)), tokens(3, (1, 1))):
    np.testing.assert_array_less(max_diff(model, reference, t), 1e-4)


@pytest.mark.parametrize("family,name", [("mamba", "no_conv_bias_expand3"), ("mamba2", "h8_g4_bias_no_conv_bias")])
def test_load_export_load_round_trip(family, name, tmp_path):
  _, _, model_cls, load, export = FAMILIES[family]
  reference = hf_model(family, name, seed=3)
  reference.save_pretrained(tmp_path / "hf")
  model, config = load(tmp_path / "hf")
  export(model, config, tmp_path / "jaxlab", max_shard_size="4KB")
  assert (tmp_path / "jaxlab" / "model.safetensors.index.json").exists()
  reloaded, reloaded_config = load(tmp_path / "jaxlab")
  assert reloaded_config == config
  chex.assert_trees_all_equal(_params(reloaded), _params(model))
  exported = model_cls.from_pretrained(tmp_path / "jaxlab").eval()
  assert exported.config.use_conv_bias  # written with jaxlab's (here zero) convolution biases
  t = tokens(4, (2, 13))
  np.testing.assert_array_less(np.abs(hf_logits(exported, t) - hf_logits(reference, t)).max(), 1e-6)


JAXLAB = {
    "mamba": dict(vocab_size=VOCAB, d_model=16, num_layers=2, mixers=("mamba",), ffns=("none",), positional="none",
                  num_heads=1, ssm_state=6, ssm_conv=3, ssm_dt_rank=3, ssm_bias=True, norm_eps=1e-6,
                  tie_embeddings=False, init_std=0.1),
    "mamba2": dict(vocab_size=VOCAB, d_model=16, num_layers=2, mixers=("mamba2",), ffns=("none",), positional="none",
                   num_heads=1, ssm_state=4, ssm_head_dim=4, ssm_groups=2, ssm_chunk=3, norm_eps=1e-6,
                   tie_embeddings=True, init_std=0.1),
}


def jaxlab_model(config, seed):
  """jaxlab's own initialization with every norm scale, bias and D moved off 1 / 0."""
  model = Transformer(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] in ("scale", "bias", "D", "norm_scale"):
      variable.set_value(variable[...] + 0.2 * rng.standard_normal(variable.shape).astype(np.float32))
  return model


@pytest.mark.parametrize("family", sorted(JAXLAB))
def test_export_of_a_jaxlab_model_loads_in_transformers(family, tmp_path):
  _, _, model_cls, load, export = FAMILIES[family]
  config = ModelConfig(**JAXLAB[family])
  model = jaxlab_model(config, seed=5)
  export(model, config, tmp_path)
  reference = model_cls.from_pretrained(tmp_path).eval()
  np.testing.assert_array_less(max_diff(model, reference, tokens(6, (2, 7))), 1e-4)
  _, reloaded_config = load(tmp_path)
  assert reloaded_config == config


@pytest.mark.parametrize("family,name", [("mamba", "untied_n8_k3_bias"), ("mamba2", "h4_g2_chunk4")])
def test_greedy_generation_matches_transformers(family, name, tmp_path):
  reference = hf_model(family, name, seed=7)
  reference.save_pretrained(tmp_path)
  model, _ = FAMILIES[family][3](tmp_path)
  prompt = tokens(8, (2, 5))
  new = 8
  reference.generation_config.eos_token_id = None  # Mamba's eos (0) would end a sequence early
  with torch.no_grad():
    expected = reference.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.ones(prompt.shape),
                                  max_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:].numpy()
  assert expected.shape == (2, new)
  np.testing.assert_array_equal(np.asarray(generate(model, prompt, new, temperature=0.0)), expected)


@pytest.mark.parametrize("family,config_cls", [(MAMBA, MambaConfig), (MAMBA2, Mamba2Config)], ids=["mamba", "mamba2"])
def test_omitted_fields_read_as_transformers_defaults(family, config_cls):
  """A config.json naming only its model_type means transformers' defaults (e.g. Mamba
  ties its embeddings, Mamba-2 has 8 groups and chunks of 256)."""
  assert config_from_hf({"model_type": family.model_type}, family) == config_from_hf(config_cls().to_dict(), family)


def test_old_embedding_name_is_read(tmp_path):
  """transformers renames ``backbone.embedding.weight`` (older exports) on load; so do we."""
  reference = hf_model("mamba", "untied_n8_k3_bias")
  reference.save_pretrained(tmp_path)
  model, _ = load_mamba(tmp_path)
  weights = tmp_path / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  chex.assert_trees_all_equal(_params(load_mamba(tmp_path)[0]), _params(model))


def _edit_config(path, **fields):
  config_path = path / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **fields}))


def test_unsupported_checkpoints_are_named(tmp_path):
  hf_model("mamba", "tied_n4_rank2").save_pretrained(tmp_path / "mamba")
  hf_model("mamba2", "h4_g2_chunk4").save_pretrained(tmp_path / "mamba2")
  with pytest.raises(ValueError, match="model_type='mamba2'; load_mamba reads only 'mamba'"):
    load_mamba(tmp_path / "mamba2")
  with pytest.raises(ValueError, match="model_type='mamba'; load_mamba2 reads only 'mamba2'"):
    load_mamba2(tmp_path / "mamba")

  _edit_config(tmp_path / "mamba", hidden_act="gelu")
  with pytest.raises(ValueError, match="hidden_act='gelu'; Mamba uses 'silu'"):
    load_mamba(tmp_path / "mamba")
  _edit_config(tmp_path / "mamba", hidden_act="silu", expand=1.5)
  with pytest.raises(ValueError, match="expand=1.5; .*integer expand"):
    load_mamba(tmp_path / "mamba")
  _edit_config(tmp_path / "mamba", expand=2, state_size=5)
  with pytest.raises(ValueError, match=r"'backbone\.layers\.0\.mixer\.x_proj\.weight' has shape \(10, 32\), but "
                     r"config.json implies \(12, 32\)"):
    load_mamba(tmp_path / "mamba")

  _edit_config(tmp_path / "mamba2", time_step_limit=[0.0, 0.5])
  with pytest.raises(ValueError, match=r"time_step_limit=\[0.0, 0.5\]; .*does not clamp"):
    load_mamba2(tmp_path / "mamba2")
  _edit_config(tmp_path / "mamba2", time_step_limit=[0.0, {"__float__": "Infinity"}], num_heads=3)
  with pytest.raises(ValueError, match="num_heads=3 x head_dim=8 is not expand x hidden_size = 32"):
    load_mamba2(tmp_path / "mamba2")
  _edit_config(tmp_path / "mamba2", num_heads=4, n_groups=3)
  with pytest.raises(ValueError, match="n_groups=3 does not divide num_heads=4"):
    load_mamba2(tmp_path / "mamba2")
  _edit_config(tmp_path / "mamba2", n_groups=2)
  weights = tmp_path / "mamba2" / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.D"}, weights)
  with pytest.raises(KeyError, match=r"backbone\.layers\.1\.mixer\.D"):
    load_mamba2(tmp_path / "mamba2")


def test_unsupported_models_do_not_export(tmp_path):
  def model_of(family, **fields):
    config = ModelConfig(**{**JAXLAB[family], "num_layers": 1, **fields})
    return Transformer(config, rngs=nnx.Rngs(0)), config

  with pytest.raises(ValueError, match="model.polarization='both' .*Mamba has no fixed"):
    export_mamba(*model_of("mamba", polarization="both"), tmp_path)
  with pytest.raises(ValueError, match=r"mixers=\('mamba2',\), ffns=\('none',\) \(Mamba needs every mixer 'mamba'"):
    export_mamba(*model_of("mamba2"), tmp_path)
  with pytest.raises(ValueError, match=r"ffns=\('mlp',\) \(Mamba-2 needs every mixer 'mamba2' and ffns=\('none',\)"):
    export_mamba2(*model_of("mamba2", ffns=("mlp",), mlp_dim=32), tmp_path)
  with pytest.raises(ValueError, match="model.norm='layernorm' \\(Mamba-2 needs 'rmsnorm'\\)"):
    export_mamba2(*model_of("mamba2", norm="layernorm"), tmp_path)
  with pytest.raises(ValueError, match="model.positional='learned' .*use 'none'"):
    export_mamba(*model_of("mamba", positional="learned"), tmp_path)
  assert not any(tmp_path.iterdir())


def test_ssm_bias_defaults_off():
  """``model.ssm_bias`` (transformers' use_bias) adds the projection biases and nothing else."""
  for family in ("mamba", "mamba2"):
    plain = nnx.eval_shape(lambda: Transformer(ModelConfig(**{**JAXLAB[family], "ssm_bias": False}), rngs=nnx.Rngs(0)))
    biased = nnx.eval_shape(lambda: Transformer(ModelConfig(**{**JAXLAB[family], "ssm_bias": True}), rngs=nnx.Rngs(0)))
    paths = lambda m: {p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    extra = paths(biased) - paths(plain)
    names = {"mamba": {"in_proj", "out_proj"}, "mamba2": {"in_xz", "in_bc", "in_dt", "out_proj"}}[family]
    assert extra == {("blocks", i, "mixer", n, "bias") for i in range(2) for n in names}
