"""Hugging Face Llama checkpoints: ``config.json`` + safetensors (single or sharded).

Tensor layout: torch ``Linear`` weights are ``[out, in]``; jaxlab kernels are
``[in..., out...]`` with heads as their own axis, e.g. ``q_proj.weight [h·d, D]`` is
``q.kernel [D, h, d]``. Both use RoPE's half-split layout, so no permutation is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jaxlab.nn import ModelConfig, Transformer

# Tensors transformers may store that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The ModelConfig of a Llama ``config.json``; other architectures are refused."""
  if hf.get("model_type") != "llama":
    raise ValueError(
        f"config.json has model_type={hf.get('model_type')!r}; load_llama reads only 'llama'."
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; Llama uses 'silu'.")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(
        f"config.json asks for rope_type={rope_type!r}; only unscaled RoPE ('default') is "
        "supported by load_llama today."
    )
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      attention_bias=bool(hf.get("attention_bias", False)),
      mlp_dim=hf["intermediate_size"],
      mlp_activation="swiglu",
      mlp_bias=bool(hf.get("mlp_bias", False)),
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
  )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """A Llama ``config.json`` for a config that is the Llama architecture."""
  problems = [
      f"model.{name}={getattr(config, name)!r} (Llama needs {want!r})"
      for name, want in (("norm", "rmsnorm"), ("mlp_activation", "swiglu"), ("positional", "rope"))
      if getattr(config, name) != want
  ]
  if set(config.mixers) != {"attention"} or set(config.ffns) != {"mlp"}:
    problems.append(f"mixers={config.mixers}, ffns={config.ffns} (Llama needs attention and mlp)")
  if problems:
    raise ValueError("this model is not a Llama and cannot be exported: " + "; ".join(problems))
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.dim_per_head,
      "hidden_act": "silu",
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "attention_bias": config.attention_bias,
      "mlp_bias": config.mlp_bias,
      "tie_word_embeddings": config.tie_embeddings,
      "initializer_range": config.init_std,
      "max_position_embeddings": 8192,
      "torch_dtype": "float32",
  }


# (jaxlab path, HF name, HF -> jaxlab array transform) for every parameter.
Mapping = list[tuple[tuple, str, Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]]


def _linear(out_shape: tuple[int, ...], in_shape: tuple[int, ...]):
  """torch [prod(out), prod(in)] <-> jaxlab [*in, *out]."""
  to_jax = lambda w: w.T.reshape(*in_shape, *out_shape)  # noqa: E731
  to_hf = lambda k: k.reshape(int(np.prod(in_shape)), int(np.prod(out_shape))).T  # noqa: E731
  return to_jax, to_hf


def _vector(shape: tuple[int, ...]):
  return (lambda b: b.reshape(shape)), (lambda b: b.reshape(-1))


def parameter_mapping(config: ModelConfig) -> Mapping:
  d, f, h, kv, hd = config.d_model, config.mlp_dim, config.num_heads, config.kv_heads, config.dim_per_head
  same = (lambda x: x, lambda x: x)
  entries: Mapping = [(("embed", "table"), "model.embed_tokens.weight", *same)]
  for i in range(config.num_layers):
    pre, hf = ("blocks", i), f"model.layers.{i}."
    entries.append(((*pre, "mixer_norm", "scale"), hf + "input_layernorm.weight", *same))
    entries.append(((*pre, "ffn_norm", "scale"), hf + "post_attention_layernorm.weight", *same))
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      proj = (*pre, "mixer", name)
      entries.append(((*proj, "kernel"), hf + f"self_attn.{name}_proj.weight", *_linear((heads, hd), (d,))))
      if config.attention_bias:
        entries.append(((*proj, "bias"), hf + f"self_attn.{name}_proj.bias", *_vector((heads, hd))))
    entries.append(((*pre, "mixer", "o", "kernel"), hf + "self_attn.o_proj.weight", *_linear((d,), (h, hd))))
    if config.attention_bias:
      entries.append(((*pre, "mixer", "o", "bias"), hf + "self_attn.o_proj.bias", *same))
    for name, out, inp in (("gate", f, d), ("up", f, d), ("down", d, f)):
      entries.append(((*pre, "ffn", name, "kernel"), hf + f"mlp.{name}_proj.weight", *_linear((out,), (inp,))))
      if config.mlp_bias:
        entries.append(((*pre, "ffn", name, "bias"), hf + f"mlp.{name}_proj.bias", *same))
  entries.append((("final_norm", "scale"), "model.norm.weight", *same))
  if not config.tie_embeddings:
    entries.append((("lm_head", "kernel"), "lm_head.weight", *_linear((config.vocab_size,), (d,))))
  return entries


def _read_tensors(path: Path) -> dict[str, jax.Array]:
  index = path / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json.")
  tensors = {}
  for name in files:
    with safe_open(path / name, framework="flax") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def _get(tree: Any, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load_llama(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Llama checkpoint directory into a jaxlab Transformer."""
  path = Path(path)
  config = config_from_hf(json.loads((path / "config.json").read_text()))
  tensors = _read_tensors(path)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  used = set()
  for jax_path, hf_name, to_jax, to_hf in parameter_mapping(config):
    if hf_name not in tensors:
      raise KeyError(f"{path} lacks tensor {hf_name!r}, needed for {'/'.join(map(str, jax_path))}.")
    variable = _get(state, jax_path)
    expected = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(variable.shape, variable.dtype)).shape
    if tuple(tensors[hf_name].shape) != expected:
      raise ValueError(
          f"tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}, but config.json implies "
          f"{expected} (for {'/'.join(map(str, jax_path))}); the config and weights disagree."
      )
    variable.set_value(to_jax(tensors[hf_name]).astype(dtype))
    used.add(hf_name)
  extra = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
  if config.tie_embeddings:
    extra = [k for k in extra if k != "lm_head.weight"]  # some exporters store the tied copy
  if extra:
    raise ValueError(f"{path} has tensors this Llama config does not use: {sorted(extra)[:10]}")
  return nnx.merge(graphdef, state), config


def export_llama(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that transformers' LlamaForCausalLM loads."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(config)
  hf_config["torch_dtype"] = jnp.dtype(dtype).name
  state = nnx.state(model)
  tensors = {
      hf_name: jnp.asarray(to_hf(_get(state, jax_path)[...]), dtype)
      for jax_path, hf_name, _, to_hf in parameter_mapping(config)
  }
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(hf_config, indent=2))
