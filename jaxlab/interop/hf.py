"""Hugging Face decoder checkpoints: ``config.json`` + safetensors (single or sharded).

Families, one row each in ``FAMILIES``; all they share (embeddings, attention, norms, the
dense MLP, head, config fields, the safetensors files) is one code path, and what differs
is data in their `Family` row:
- Llama (``LlamaForCausalLM``): `load_llama` / `export_llama`.
- Mixtral (``MixtralForCausalLM``): `load_mixtral` / `export_mixtral`; every layer ``moe``.
- Qwen2-MoE (``Qwen2MoeForCausalLM``): `load_qwen2_moe` / `export_qwen2_moe`; routed
  experts plus one shared expert under a sigmoid gate, dense layers where
  ``mlp_only_layers`` / ``decoder_sparse_step`` put them (an ``ffns`` pattern).
- Mamba (``MambaForCausalLM``): `load_mamba` / `export_mamba`; every layer ``mamba``, no FFN.
- Mamba-2 (``Mamba2ForCausalLM``): `load_mamba2` / `export_mamba2`; every layer ``mamba2``, no FFN.

A `Backbone` is what a group of families shares: the decoder one (``model.embed_tokens``,
``model.layers.{i}`` with attention and an FFN, ``model.norm``; the three above) and the
state-space one (``backbone.embeddings``, ``backbone.layers.{i}.norm`` + ``.mixer``,
``backbone.norm_f``; the two Mamba families), each with its own config.json fields.

Tensor layout: torch ``Linear`` weights are ``[out, in]``; jaxlab kernels are
``[in..., out...]`` with heads as their own axis, e.g. ``q_proj.weight [h·d, D]`` is
``q.kernel [D, h, d]``. Both use RoPE's half-split layout, so no permutation is needed.

Expert weights come in two layouts and both are read (checked against transformers 5.x):
- per expert, the format of the Hub checkpoints and of ``save_pretrained`` in every
  transformers version (v5 converts it on load and back on save): Mixtral
  ``model.layers.{i}.block_sparse_moe.gate.weight [E, D]`` and
  ``...block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate ``[F, D]``, up ``[F, D]``,
  down ``[D, F]``); Qwen2-MoE ``model.layers.{i}.mlp.gate.weight`` and
  ``...mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``;
- fused, transformers >= 5's in-memory names (``save_pretrained(save_original_format=False)``):
  ``model.layers.{i}.mlp.gate.weight``, ``...mlp.experts.gate_up_proj [E, 2F, D]`` (gate
  rows first) and ``...mlp.experts.down_proj [E, D, F]``.
Exports write the per-expert layout, which every transformers version loads.

Mamba tensors (``backbone.layers.{i}.mixer.``; e = expand·hidden, torch ``Conv1d`` weights
``[channels, 1, K]`` are jaxlab ``[K, channels]``, both cross-correlate over the last K inputs):
- Mamba: ``in_proj [2e, D]`` rows x then z <-> ``in_proj.kernel [D, 2, e]``; ``conv1d`` over x;
  ``x_proj [r + 2N, e]`` (Δ_low, B, C) <-> ``x_proj.kernel``; ``dt_proj.weight [e, r]`` <->
  ``dt_proj [r, e]`` and ``dt_proj.bias`` <-> ``dt_bias``; ``A_log [e, N]``, ``D [e]`` as they are.
- Mamba-2: ``in_proj [2e + 2GN + H, D]`` rows z, x, B, C, Δ <-> ``in_xz [D, 2, e]`` (x first),
  ``in_bc [D, 2GN]`` and ``in_dt [D, H]``; ``conv1d [e + 2GN, 1, K]`` over x, B, C <-> ``conv_x`` and
  ``conv_bc``; ``dt_bias``, ``A_log``, ``D`` ``[H]``; the gated norm ``norm.weight [e]`` <->
  ``norm_scale`` (RMS over G groups of e/G, ``norm_before_gate=False``: jaxlab's `gated_rms_norm`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
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


# ---- the parameter table ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  """jaxlab parameters (state paths ``jax``) <-> HF tensors (names ``hf``): ``to_jax`` maps
  the list of HF tensors, in ``hf`` order, to the list of jaxlab arrays, in ``jax`` order;
  ``to_hf`` maps back. ``hf=()``: the HF architecture has no such tensor and jaxlab's is
  zero (Qwen2's ``o_proj`` has no bias where jaxlab's ``attention_bias`` has one)."""

  jax: tuple[tuple, ...]
  hf: tuple[str, ...]
  to_jax: Callable[[list], list] | None = None
  to_hf: Callable[[list], list] | None = None


Mapping = list[Entry]
_SAME = (lambda x: x, lambda x: x)


def _linear(out_shape: tuple[int, ...], in_shape: tuple[int, ...]):
  """torch [prod(out), prod(in)] <-> jaxlab [*in, *out]."""
  to_jax = lambda w: w.T.reshape(*in_shape, *out_shape)  # noqa: E731
  to_hf = lambda k: k.reshape(int(np.prod(in_shape)), int(np.prod(out_shape))).T  # noqa: E731
  return to_jax, to_hf


def _vector(shape: tuple[int, ...]):
  return (lambda b: b.reshape(shape)), (lambda b: b.reshape(-1))


def _one(jax_path: tuple, hf_name: str, transform=_SAME) -> Entry:
  to_jax, to_hf = transform
  return Entry((jax_path,), (hf_name,), lambda ws: [to_jax(ws[0])], lambda ks: [to_hf(ks[0])])


def _stacked(jax_path: tuple, hf_names: list[str]) -> Entry:
  """E torch Linear weights ``[out, in]`` <-> one jaxlab ``[E, in, out]``."""
  return Entry((jax_path,), tuple(hf_names), lambda ws: [jnp.stack([w.T for w in ws])],
               lambda ks: list(jnp.swapaxes(ks[0], 1, 2)))


def _fused_gate_up(gate_path: tuple, up_path: tuple, hf_name: str, f: int) -> Entry:
  """transformers >= 5's ``gate_up_proj [E, 2F, D]`` <-> jaxlab gate and up ``[E, D, F]``."""
  return Entry(
      (gate_path, up_path), (hf_name,),
      lambda ws: [jnp.swapaxes(ws[0][:, :f], 1, 2), jnp.swapaxes(ws[0][:, f:], 1, 2)],
      lambda ks: [jnp.concatenate([jnp.swapaxes(ks[0], 1, 2), jnp.swapaxes(ks[1], 1, 2)], axis=1)],
  )


def _attention(config: ModelConfig, family: Family, pre: tuple, hf: str) -> Mapping:
  d, h, kv, hd = config.d_model, config.num_heads, config.kv_heads, config.dim_per_head
  shapes = {"q": (h, hd), "k": (kv, hd), "v": (kv, hd)}
  entries = [_one((*pre, "mixer", name, "kernel"), hf + f"self_attn.{name}_proj.weight", _linear(shape, (d,)))
             for name, shape in shapes.items()]
  entries.append(_one((*pre, "mixer", "o", "kernel"), hf + "self_attn.o_proj.weight", _linear((d,), (h, hd))))
  if config.attention_bias:
    for name, shape in (*shapes.items(), ("o", (d,))):
      path = (*pre, "mixer", name, "bias")
      entries.append(_one(path, hf + f"self_attn.{name}_proj.bias", _vector(shape))
                     if name in family.attention_biases else Entry((path,), ()))
  return entries


def _mlp(pre: tuple, hf: str, d: int, f: int, bias: bool) -> Mapping:
  """A SwiGLU MLP (jaxlab `MLP` at ``pre``) <-> ``{hf}gate_proj|up_proj|down_proj``."""
  entries = []
  for name, out, inp in (("gate", f, d), ("up", f, d), ("down", d, f)):
    entries.append(_one((*pre, name, "kernel"), hf + f"{name}_proj.weight", _linear((out,), (inp,))))
    if bias:
      entries.append(_one((*pre, name, "bias"), hf + f"{name}_proj.bias"))
  return entries


def _moe(config: ModelConfig, family: Family, pre: tuple, hf: str, layout: str) -> Mapping:
  e, d, f = config.moe_num_experts, config.d_model, config.expert_dim
  ffn = (*pre, "ffn")
  block = hf + (family.moe_block if layout == "per_expert" else "mlp") + "."
  entries = [_one((*ffn, "router", "kernel"), block + "gate.weight", _linear((e,), (d,)))]
  experts = {name: (*ffn, "experts", name) for name in ("gate", "up", "down")}
  if layout == "fused":
    entries.append(_fused_gate_up(experts["gate"], experts["up"], block + "experts.gate_up_proj", f))
    entries.append(_one(experts["down"], block + "experts.down_proj",
                        (lambda w: jnp.swapaxes(w, 1, 2), lambda k: jnp.swapaxes(k, 1, 2))))
  else:
    for name, hf_name in zip(("gate", "up", "down"), family.expert_names):
      entries.append(_stacked(experts[name], [block + f"experts.{j}.{hf_name}.weight" for j in range(e)]))
  if config.shared_dim:
    entries += _mlp((*ffn, "shared"), block + "shared_expert.", d, config.shared_dim, config.mlp_bias)
    if config.moe_shared_gate:
      entries.append(_one((*ffn, "shared_gate", "kernel"), block + "shared_expert_gate.weight", _linear((1,), (d,))))
  return entries


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint stores what its ModelConfig does not say: the expert tensors
  (``experts``: "per_expert" | "fused") and whether the SSM convolutions have biases
  (``conv_bias``, transformers' ``use_conv_bias``; jaxlab's always have one, zeros where
  the checkpoint has none). Exports write the default."""

  experts: str = "per_expert"
  conv_bias: bool = True


def _decoder_layer(config: ModelConfig, family: Family, i: int, pre: tuple, hf: str, layout: Layout) -> Mapping:
  """``model.layers.{i}``: two norms, attention and an MLP or MoE FFN."""
  entries = [_one((*pre, "mixer_norm", "scale"), hf + "input_layernorm.weight"),
             _one((*pre, "ffn_norm", "scale"), hf + "post_attention_layernorm.weight")]
  entries += _attention(config, family, pre, hf)
  if config.ffn_of(i) == "moe":
    return entries + _moe(config, family, pre, hf, layout.experts)
  return entries + _mlp((*pre, "ffn"), hf + "mlp.", config.d_model, config.mlp_dim, config.mlp_bias)


def _conv(paths: tuple[tuple, ...], widths: tuple[int, ...], hf: str, layout: Layout) -> Mapping:
  """One torch depthwise ``Conv1d`` (``{hf}weight [sum(widths), 1, K]``, ``{hf}bias``) <->
  the jaxlab `CausalConv`s at ``paths`` over consecutive channel ranges of ``widths``."""
  cuts = list(np.cumsum(widths)[:-1])
  kernels, biases = tuple((*p, "kernel") for p in paths), tuple((*p, "bias") for p in paths)
  entries = [Entry(kernels, (hf + "weight",), lambda ws: jnp.split(ws[0][:, 0, :].T, cuts, axis=1),
                   lambda ks: [jnp.concatenate(ks, axis=1).T[:, None, :]])]
  if not layout.conv_bias:
    return entries + [Entry(biases, ())]
  return entries + [Entry(biases, (hf + "bias",), lambda ws: jnp.split(ws[0], cuts), lambda ks: [jnp.concatenate(ks)])]


def _mamba(config: ModelConfig, pre: tuple, hf: str, layout: Layout) -> Mapping:
  """transformers' ``MambaMixer`` <-> jaxlab `Mamba` (the module docstring's table)."""
  d, e, n, r = config.d_model, config.ssm_inner, config.state_size("mamba"), config.dt_rank
  entries = [_one((*pre, "in_proj", "kernel"), hf + "in_proj.weight", _linear((2, e), (d,))),
             *_conv(((*pre, "conv"),), (e,), hf + "conv1d.", layout),
             _one((*pre, "x_proj", "kernel"), hf + "x_proj.weight", _linear((r + 2 * n,), (e,))),
             _one((*pre, "dt_proj"), hf + "dt_proj.weight", _linear((e,), (r,))),
             _one((*pre, "dt_bias"), hf + "dt_proj.bias"),
             _one((*pre, "A_log"), hf + "A_log"),
             _one((*pre, "D"), hf + "D"),
             _one((*pre, "out_proj", "kernel"), hf + "out_proj.weight", _linear((d,), (e,)))]
  if config.ssm_bias:
    entries += [_one((*pre, "in_proj", "bias"), hf + "in_proj.bias", _vector((2, e))),
                _one((*pre, "out_proj", "bias"), hf + "out_proj.bias")]
  return entries


def _mamba2_in_proj(pre: tuple, hf_name: str, param: str, e: int, bc: int) -> Entry:
  """``in_proj.weight [2e + bc + H, D]`` (or its bias), rows z, x, B·C, Δ <-> jaxlab
  ``in_xz`` (x and z stacked, x first), ``in_bc`` and ``in_dt``."""
  out_last = (lambda w: w.T) if param == "kernel" else (lambda b: b)  # noqa: E731

  def to_jax(ws):
    z, x, b_c, dt = jnp.split(out_last(ws[0]), [e, 2 * e, 2 * e + bc], axis=-1)
    return [jnp.stack([x, z], axis=-2), b_c, dt]

  def to_hf(ks):
    xz, b_c, dt = ks
    return [out_last(jnp.concatenate([xz[..., 1, :], xz[..., 0, :], b_c, dt], axis=-1))]

  return Entry(tuple((*pre, name, param) for name in ("in_xz", "in_bc", "in_dt")), (hf_name,), to_jax, to_hf)


def _mamba2(config: ModelConfig, pre: tuple, hf: str, layout: Layout) -> Mapping:
  """transformers' ``Mamba2Mixer`` <-> jaxlab `Mamba2` (the module docstring's table)."""
  d, e = config.d_model, config.ssm_inner
  bc = 2 * config.ssm_groups * config.state_size("mamba2")
  entries = [_mamba2_in_proj(pre, hf + "in_proj.weight", "kernel", e, bc),
             *_conv(((*pre, "conv_x"), (*pre, "conv_bc")), (e, bc), hf + "conv1d.", layout),
             *[_one((*pre, name), hf + name) for name in ("dt_bias", "A_log", "D")],
             _one((*pre, "norm_scale"), hf + "norm.weight"),
             _one((*pre, "out_proj", "kernel"), hf + "out_proj.weight", _linear((d,), (e,)))]
  if config.ssm_bias:
    entries += [_mamba2_in_proj(pre, hf + "in_proj.bias", "bias", e, bc),
                _one((*pre, "out_proj", "bias"), hf + "out_proj.bias")]
  return entries


_SSM_MIXERS = {"mamba": _mamba, "mamba2": _mamba2}


def _ssm_layer(config: ModelConfig, family: Family, i: int, pre: tuple, hf: str, layout: Layout) -> Mapping:
  """``backbone.layers.{i}``: one norm and the mixer; no FFN."""
  mixer = _SSM_MIXERS[family.mixer](config, (*pre, "mixer"), hf + "mixer.", layout)
  return [_one((*pre, "mixer_norm", "scale"), hf + "norm.weight"), *mixer]


def parameter_mapping(config: ModelConfig, family: Family | None = None,
                      layout: Layout | str = Layout()) -> Mapping:
  """Every jaxlab parameter of ``config`` against the tensors of ``family``'s checkpoints
  (Llama by default) stored as ``layout`` says (a string: the expert layout, "per_expert" |
  "fused")."""
  family = family or LLAMA
  layout = Layout(experts=layout) if isinstance(layout, str) else layout
  names = family.backbone
  entries: Mapping = [_one(("embed", "table"), names.prefix + names.embeddings + ".weight")]
  for i in range(config.num_layers):
    entries += names.layer(config, family, i, ("blocks", i), f"{names.prefix}layers.{i}.", layout)
  entries.append(_one(("final_norm", "scale"), names.prefix + names.final_norm + ".weight"))
  if not config.tie_embeddings:
    entries.append(_one(("lm_head", "kernel"), "lm_head.weight", _linear((config.vocab_size,), (config.d_model,))))
  return entries


# ---- config.json ------------------------------------------------------------------------
def _check_type(hf: dict[str, Any], family: Family) -> None:
  if hf.get("model_type") != family.model_type:
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; {family.loader} reads only "
                     f"{family.model_type!r}.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; {family.name} uses 'silu'.")


def _decoder_config(hf: dict[str, Any], family: Family) -> dict[str, Any]:
  """The ModelConfig fields every attention + FFN family reads the same way."""
  _check_type(hf, family)
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"config.json asks for rope_type={rope_type!r}; only unscaled RoPE ('default') is "
                     f"supported by {family.loader} today.")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  return dict(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", family.default_theta))),
      mlp_activation="swiglu",
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
  )


def _decoder_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
  return {
      "architectures": [family.architecture],
      "model_type": family.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.dim_per_head,
      "hidden_act": "silu",
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_embeddings,
      "initializer_range": config.init_std,
      "max_position_embeddings": 8192,
      "torch_dtype": "float32",
  }


def _decoder_problems(config: ModelConfig, family: Family) -> list[str]:
  want = {"norm": "rmsnorm", "mlp_activation": "swiglu", "positional": "rope", "rope_scaling": None,
          "logit_soft_cap": None, "attention_gate": None, "block_experts": 0, "abacus": False}
  if not family.sliding_window:
    want["sliding_window"] = None
  if family.moe_block:
    want["mlp_bias"] = False
  if not family.attention_biases:
    want["attention_bias"] = False
  problems = [f"model.{name}={getattr(config, name)!r} ({family.name} needs {value!r})"
              for name, value in want.items() if getattr(config, name) != value]
  if set(config.mixers) != {"attention"} or not set(config.ffns) <= set(family.ffns) or (
      family.moe_block and "moe" not in config.ffns):
    problems.append(f"mixers={config.mixers}, ffns={config.ffns} ({family.name} needs attention and "
                    f"{' and '.join(family.ffns)})")
  return problems + _moe_problems(config, family)


def _moe_fields(hf: dict[str, Any], num_experts: int, renormalize: bool) -> dict[str, Any]:
  return dict(
      moe_num_experts=num_experts,
      moe_top_k=hf["num_experts_per_tok"],
      moe_router="topk",
      moe_gate_order="softmax_topk",
      moe_renormalize=renormalize,
      moe_dispatch="dropless",
      moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
      moe_z_loss_weight=0.0,
      moe_jitter=0.0,
  )


def _moe_problems(config: ModelConfig, family: Family) -> list[str]:
  if "moe" not in config.ffns:
    return []
  problems = [] if config.moe_router == "topk" else [
      f"model.moe_router={config.moe_router!r} ({family.name} routes softmax top-k: 'topk')"]
  if family.renormalize is not None and _renormalized(config) != family.renormalize:
    problems.append(f"model.moe_renormalize={config.moe_renormalize!r} with moe_gate_order="
                    f"{config.moe_gate_order!r} ({family.name} renormalizes the top-k gates)")
  return problems


def _renormalized(config: ModelConfig) -> bool:
  return config.moe_gate_order == "topk_softmax" or config.moe_renormalize


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
  return dict(attention_bias=bool(hf.get("attention_bias", False)), mlp_dim=hf["intermediate_size"],
              mlp_bias=bool(hf.get("mlp_bias", False)))


def _llama_hf(config: ModelConfig) -> dict[str, Any]:
  return {"intermediate_size": config.mlp_dim, "attention_bias": config.attention_bias,
          "mlp_bias": config.mlp_bias}


def _mixtral_fields(hf: dict[str, Any]) -> dict[str, Any]:
  window = hf.get("sliding_window")
  if window is not None and window < 1:
    raise ValueError(f"config.json sliding_window={window!r}; load_mixtral needs None or a window >= 1.")
  return dict(ffns=("moe",), mlp_dim=hf["intermediate_size"], sliding_window=window,
              **_moe_fields(hf, hf["num_local_experts"], renormalize=True))


def _mixtral_hf(config: ModelConfig) -> dict[str, Any]:
  return {"intermediate_size": config.expert_dim, "num_local_experts": config.moe_num_experts,
          "num_experts_per_tok": config.moe_top_k, "router_aux_loss_coef": config.moe_aux_loss_weight,
          "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": config.sliding_window}


def _mixtral_problems(config: ModelConfig) -> list[str]:
  return [f"a shared MLP {config.shared_dim} wide (model.moe_shared_experts, moe_shared_dim; Mixtral has "
          "no shared experts)"] if config.shared_dim else []


def _shortest_pattern(kinds: list[str]) -> tuple[str, ...]:
  """The shortest ``ffns`` whose repetition gives ``kinds`` (at worst ``kinds`` itself)."""
  for p in range(1, len(kinds) + 1):
    if all(kind == kinds[i % p] for i, kind in enumerate(kinds)):
      return tuple(kinds[:p])
  raise AssertionError("unreachable")


def _qwen2_moe_layer_types(hf: dict[str, Any]) -> list[str]:
  n = hf["num_hidden_layers"]
  sliding = bool(hf.get("use_sliding_window", False))
  return hf.get("layer_types") or [
      "sliding_attention" if sliding and (i + 1) % 2 and i < hf.get("max_window_layers", 28) else "full_attention"
      for i in range(n)]


def _qwen2_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
  n, e = hf["num_hidden_layers"], hf.get("num_experts", 60)
  step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
  kinds = ["moe" if i not in dense and e > 0 and (i + 1) % step == 0 else "mlp" for i in range(n)]
  if "moe" not in kinds:
    raise ValueError(f"config.json: num_experts={e}, decoder_sparse_step={step}, mlp_only_layers="
                     f"{sorted(dense)} leave no MoE layer; that is a dense Qwen2, which load_qwen2_moe "
                     "does not read.")
  expert, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
  if shared <= 0 or shared % expert:
    raise ValueError(
        f"config.json shared_expert_intermediate_size={shared} is not a positive multiple of "
        f"moe_intermediate_size={expert}; jaxlab's shared MLP is moe_shared_experts x the expert width.")
  types = _qwen2_moe_layer_types(hf)
  window = None
  if set(types) == {"sliding_attention"} and hf.get("use_sliding_window") and hf.get("sliding_window"):
    window = hf["sliding_window"]
  elif set(types) != {"full_attention"}:
    raise ValueError(
        f"config.json use_sliding_window={hf.get('use_sliding_window')!r}, max_window_layers="
        f"{hf.get('max_window_layers')!r} give layer_types={types}; jaxlab's model.sliding_window applies to "
        "every layer, so load_qwen2_moe reads only all-full or all-sliding attention.")
  return dict(ffns=_shortest_pattern(kinds), mlp_dim=hf["intermediate_size"], moe_expert_dim=expert,
              moe_shared_experts=shared // expert, moe_shared_gate=True, sliding_window=window,
              attention_bias=bool(hf.get("qkv_bias", True)),
              **_moe_fields(hf, e, renormalize=bool(hf.get("norm_topk_prob", False))))


def _qwen2_moe_hf(config: ModelConfig) -> dict[str, Any]:
  n = config.num_layers
  moe = [config.ffn_of(i) == "moe" for i in range(n)]
  step = next((s for s in range(1, n + 1) if moe == [(i + 1) % s == 0 for i in range(n)]), 1)
  sparse = [(i + 1) % step == 0 for i in range(n)]
  window = config.sliding_window
  return {
      "intermediate_size": config.mlp_dim, "moe_intermediate_size": config.expert_dim,
      "shared_expert_intermediate_size": config.shared_dim,
      "num_experts": config.moe_num_experts, "num_experts_per_tok": config.moe_top_k,
      "norm_topk_prob": _renormalized(config), "qkv_bias": config.attention_bias,
      "decoder_sparse_step": step, "mlp_only_layers": [i for i in range(n) if sparse[i] and not moe[i]],
      "use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": n,
      "layer_types": ["full_attention" if window is None else "sliding_attention"] * n,
      "router_aux_loss_coef": config.moe_aux_loss_weight, "output_router_logits": False,
  }


def _qwen2_moe_problems(config: ModelConfig) -> list[str]:
  if config.shared_dim and config.moe_shared_gate:
    return []
  return [f"a shared MLP {config.shared_dim} wide, moe_shared_gate={config.moe_shared_gate} "
          "(Qwen2-MoE has a shared expert under a sigmoid gate in every MoE layer)"]


# transformers 5.x's MambaConfig / Mamba2Config defaults: what a config.json that omits a field means.
_SSM_DEFAULTS = {
    "mamba": dict(vocab_size=50280, hidden_size=768, num_hidden_layers=32, state_size=16, expand=2, conv_kernel=4,
                  layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                  time_step_rank="auto", time_step_min=0.001, time_step_max=0.1, initializer_range=0.1,
                  tie_word_embeddings=True),
    "mamba2": dict(vocab_size=32768, hidden_size=4096, num_hidden_layers=64, state_size=128, expand=2, conv_kernel=4,
                   layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                   time_step_min=0.001, time_step_max=0.1, initializer_range=0.1, tie_word_embeddings=False,
                   num_heads=128, head_dim=64, n_groups=8, chunk_size=256, time_step_limit=(0.0, math.inf)),
}


def _ssm_get(hf: dict[str, Any], model_type: str, key: str) -> Any:
  return hf.get(key, _SSM_DEFAULTS[model_type][key])


def _ssm_config(hf: dict[str, Any], family: Family) -> dict[str, Any]:
  """The ModelConfig fields both Mamba families read the same way: every layer the family's
  mixer and no FFN; ``layer_norm_epsilon`` is every RMSNorm's eps (Mamba-2's gated one too).
  ``residual_in_fp32`` is not read: jaxlab's residual stream has the parameters' dtype, the
  same in fp32."""
  _check_type(hf, family)
  get = functools.partial(_ssm_get, hf, family.model_type)
  expand = get("expand")
  if expand != int(expand) or expand < 1:
    raise ValueError(f"config.json expand={expand!r}; jaxlab's inner width is model.ssm_expand x d_model with a "
                     f"whole ssm_expand, so {family.loader} needs an integer expand >= 1.")
  return dict(
      vocab_size=get("vocab_size"), d_model=get("hidden_size"), num_layers=get("num_hidden_layers"),
      mixers=(family.mixer,), ffns=("none",),
      positional="none", num_heads=1,  # unused without attention; 1 divides every d_model
      norm="rmsnorm", norm_eps=float(get("layer_norm_epsilon")),
      ssm_state=get("state_size"), ssm_expand=int(expand), ssm_conv=get("conv_kernel"), ssm_bias=bool(get("use_bias")),
      ssm_dt_min=float(get("time_step_min")), ssm_dt_max=float(get("time_step_max")),
      tie_embeddings=bool(get("tie_word_embeddings")), init_std=float(get("initializer_range")),
  )


def _ssm_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
  return {
      "architectures": [family.architecture],
      "model_type": family.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "num_hidden_layers": config.num_layers,
      "state_size": config.state_size(family.mixer),
      "expand": config.ssm_expand,
      "conv_kernel": config.ssm_conv,
      "use_bias": config.ssm_bias,
      "use_conv_bias": True,
      "hidden_act": "silu",
      "layer_norm_epsilon": config.norm_eps,
      "residual_in_fp32": True,
      "time_step_min": config.ssm_dt_min,
      "time_step_max": config.ssm_dt_max,
      "tie_word_embeddings": config.tie_embeddings,
      "initializer_range": config.init_std,
      "torch_dtype": "float32",
  }


def _ssm_problems(config: ModelConfig, family: Family) -> list[str]:
  want = {"norm": "rmsnorm", "block_experts": 0, "abacus": False}
  problems = [f"model.{name}={getattr(config, name)!r} ({family.name} needs {value!r})"
              for name, value in want.items() if getattr(config, name) != value]
  if config.positional == "learned":
    problems.append(f"model.positional='learned' ({family.name} has no position embeddings: use 'none')")
  if set(config.mixers) != {family.mixer} or set(config.ffns) != set(family.ffns):
    problems.append(f"mixers={config.mixers}, ffns={config.ffns} ({family.name} needs every mixer "
                    f"{family.mixer!r} and ffns={family.ffns}: its blocks have no FFN)")
  return problems


def _mamba_fields(hf: dict[str, Any]) -> dict[str, Any]:
  rank = _ssm_get(hf, "mamba", "time_step_rank")
  return dict(ssm_dt_rank=-(-_ssm_get(hf, "mamba", "hidden_size") // 16) if rank == "auto" else int(rank))


def _mamba_hf(config: ModelConfig) -> dict[str, Any]:
  return {"time_step_rank": config.dt_rank, "intermediate_size": config.ssm_inner}


def _mamba_problems(config: ModelConfig) -> list[str]:
  return [] if config.polarization is None else [
      f"model.polarization={config.polarization!r} (Mamba has no fixed A = 0 / A = -inf states: None)"]


def _mamba2_fields(hf: dict[str, Any]) -> dict[str, Any]:
  get = functools.partial(_ssm_get, hf, "mamba2")
  heads, head_dim, groups = get("num_heads"), get("head_dim"), get("n_groups")
  inner = get("expand") * get("hidden_size")
  if heads * head_dim != inner:
    raise ValueError(f"config.json num_heads={heads} x head_dim={head_dim} is not expand x hidden_size = {inner}; "
                     "jaxlab's mamba2 has ssm_expand x d_model / ssm_head_dim heads, so the widths must agree.")
  if heads % groups:
    raise ValueError(f"config.json n_groups={groups} does not divide num_heads={heads}; each group of B and C "
                     "serves num_heads / n_groups heads.")
  low, high = (float(v) for v in get("time_step_limit"))
  if low > 0 or high != math.inf:
    raise ValueError(
        f"config.json time_step_limit={[low, high]}; transformers clamps Δ to it (when it scans a sequence, "
        "not when it decodes a token), jaxlab's mamba2 does not clamp, so load_mamba2 reads only limits that "
        "clamp nothing: [0.0, inf] (the default).")
  return dict(ssm_head_dim=head_dim, ssm_groups=groups, ssm_chunk=get("chunk_size"))


def _mamba2_hf(config: ModelConfig) -> dict[str, Any]:
  # time_step_limit is left at transformers' default, (0, inf): no clamp, as in jaxlab
  return {"num_heads": config.ssm_heads, "head_dim": config.ssm_head_dim, "n_groups": config.ssm_groups,
          "chunk_size": config.ssm_chunk}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What a group of families shares: the tensor names around the layers, one layer's
  entries, and the config.json fields its members read and write the same way."""

  prefix: str  # of the embeddings, the layers and the final norm
  embeddings: str
  final_norm: str
  layer: Callable[..., Mapping]  # (config, family, i, jaxlab path, HF prefix, Layout) -> layer i's entries
  fields: Callable[[dict[str, Any], Family], dict[str, Any]]  # config.json -> shared ModelConfig fields
  hf_fields: Callable[[ModelConfig, Family], dict[str, Any]]  # ModelConfig -> shared config.json fields
  problems: Callable[[ModelConfig, Family], list[str]]  # why a ModelConfig cannot be exported
  renames: tuple[tuple[str, str], ...] = ()  # (old, new) tensor-name prefixes transformers also reads


DECODER = Backbone("model.", "embed_tokens", "norm", _decoder_layer, _decoder_config, _decoder_hf, _decoder_problems)
SSM = Backbone("backbone.", "embeddings", "norm_f", _ssm_layer, _ssm_config, _ssm_hf, _ssm_problems,
               renames=(("backbone.embedding.", "backbone.embeddings."),))


@dataclasses.dataclass(frozen=True)
class Family:
  """What one Hugging Face architecture adds to its backbone's shared mapping."""

  name: str
  model_type: str
  architecture: str
  fields: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> family ModelConfig fields
  hf_fields: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> family config.json fields
  problems: Callable[[ModelConfig], list[str]]  # why a ModelConfig cannot be exported
  backbone: Backbone = DECODER
  mixer: str = "attention"  # every layer's jaxlab mixer
  ffns: tuple[str, ...] = ("mlp",)  # FFN kinds the architecture has
  # attention + FFN families
  default_theta: float = 10_000.0  # transformers' RoPE base when config.json names none
  attention_biases: tuple[str, ...] = ()  # projections with a bias when attention_bias (others: jaxlab zeros)
  sliding_window: bool = False  # whether a uniform sliding window maps
  renormalize: bool | None = None  # the top-k gates must (not) be renormalized; None: a config field says
  moe_block: str = ""  # HF module of a per-expert MoE layer ("" without MoE)
  expert_names: tuple[str, str, str] = ("", "", "")  # per-expert HF names of gate, up, down

  @property
  def loader(self) -> str:
    return f"load_{self.model_type}"


_NO_PROBLEMS = lambda config: []  # noqa: E731
LLAMA = Family("Llama", "llama", "LlamaForCausalLM", _llama_fields, _llama_hf, _NO_PROBLEMS,
               attention_biases=("q", "k", "v", "o"))
MIXTRAL = Family("Mixtral", "mixtral", "MixtralForCausalLM", _mixtral_fields, _mixtral_hf, _mixtral_problems,
                 ffns=("moe",), default_theta=1_000_000.0, sliding_window=True, renormalize=True,
                 moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"))
QWEN2_MOE = Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_fields, _qwen2_moe_hf,
                   _qwen2_moe_problems, ffns=("mlp", "moe"), attention_biases=("q", "k", "v"), sliding_window=True,
                   moe_block="mlp", expert_names=("gate_proj", "up_proj", "down_proj"))
MAMBA = Family("Mamba", "mamba", "MambaForCausalLM", _mamba_fields, _mamba_hf, _mamba_problems, backbone=SSM,
               mixer="mamba", ffns=("none",))
MAMBA2 = Family("Mamba-2", "mamba2", "Mamba2ForCausalLM", _mamba2_fields, _mamba2_hf, _NO_PROBLEMS, backbone=SSM,
                mixer="mamba2", ffns=("none",))
FAMILIES = {f.model_type: f for f in (LLAMA, MIXTRAL, QWEN2_MOE, MAMBA, MAMBA2)}


def _decode_floats(value: Any) -> Any:
  """transformers >= 5 writes inf and nan into config.json as ``{"__float__": "Infinity"}``."""
  if isinstance(value, dict):
    if set(value) == {"__float__"} and isinstance(value["__float__"], str):
      return float(value["__float__"])
    return {k: _decode_floats(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode_floats(v) for v in value]
  return value


def config_from_hf(hf: dict[str, Any], family: Family | None = None) -> ModelConfig:
  """The ModelConfig of a ``config.json`` of ``family`` (Llama by default); other
  architectures, and settings jaxlab cannot express, are refused naming the field."""
  family = family or LLAMA
  hf = _decode_floats(hf)
  return ModelConfig(**family.backbone.fields(hf, family), **family.fields(hf))


def config_to_hf(config: ModelConfig, family: Family | None = None) -> dict[str, Any]:
  """A ``config.json`` of ``family`` (Llama by default) for a config of that architecture."""
  family = family or LLAMA
  problems = family.backbone.problems(config, family) + family.problems(config)
  if problems:
    raise ValueError(f"this model is not a {family.name} and cannot be exported: " + "; ".join(problems))
  return {**family.backbone.hf_fields(config, family), **family.hf_fields(config)}


# ---- safetensors files ------------------------------------------------------------------
_INDEX = "model.safetensors.index.json"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _read_tensors(path: Path) -> dict[str, jax.Array]:
  index = path / _INDEX
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{path} has neither model.safetensors nor {_INDEX}.")
  tensors = {}
  for name in files:
    with safe_open(path / name, framework="flax") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def _size_in_bytes(size: int | str | None) -> int | None:
  if size is None or isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
  if not match:
    raise ValueError(f"max_shard_size={size!r}: give bytes (an int) or e.g. '5GB', '500MiB'.")
  return int(float(match[1]) * _SIZE_UNITS[match[2]])


def _write_tensors(tensors: dict[str, jax.Array], path: Path, max_shard_size: int | str | None) -> None:
  """One ``model.safetensors``, or shards of at most ``max_shard_size`` (a tensor larger than
  that gets a shard of its own) and ``model.safetensors.index.json``, named as transformers
  names them. Weight files of an earlier export into ``path`` are removed first."""
  limit = _size_in_bytes(max_shard_size)
  shards, size = [[]], 0
  for name, tensor in tensors.items():
    nbytes = tensor.size * tensor.dtype.itemsize
    if limit is not None and shards[-1] and size + nbytes > limit:
      shards, size = [*shards, []], 0
    shards[-1].append(name)
    size += nbytes
  for stale in [path / "model.safetensors", path / _INDEX, *path.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  if len(shards) == 1:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for k, names in enumerate(shards, 1):
    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(names, file))
  total = sum(t.size * t.dtype.itemsize for t in tensors.values())
  (path / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- load and export --------------------------------------------------------------------
def _get(tree: Any, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _named(paths: tuple[tuple, ...]) -> str:
  return ", ".join("/".join(map(str, p)) for p in paths)


def _load(path: str | Path, family: Family, dtype) -> tuple[Transformer, ModelConfig]:
  path = Path(path)
  hf_config = json.loads((path / "config.json").read_text())
  config = config_from_hf(hf_config, family)
  tensors = _read_tensors(path)
  for old, new in family.backbone.renames:
    tensors = {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}
  layout = Layout("fused" if any(k.endswith(".experts.gate_up_proj") for k in tensors) else "per_expert",
                  conv_bias=bool(hf_config.get("use_conv_bias", True)))
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  used, covered = set(), set()
  for entry in parameter_mapping(config, family, layout):
    variables = [_get(state, p) for p in entry.jax]
    covered.update(entry.jax)
    if not entry.hf:
      for variable in variables:
        variable.set_value(jnp.zeros(variable.shape, dtype))
      continue
    for name in entry.hf:
      if name not in tensors:
        raise KeyError(f"{path} lacks tensor {name!r}, needed for {_named(entry.jax)}.")
    expected = jax.eval_shape(entry.to_hf, [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables])
    for name, want in zip(entry.hf, expected):
      if tuple(tensors[name].shape) != want.shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(tensors[name].shape)}, but config.json implies "
            f"{want.shape} (for {_named(entry.jax)}); the config and weights disagree."
        )
    for variable, value in zip(variables, entry.to_jax([tensors[n] for n in entry.hf])):
      variable.set_value(value.astype(dtype))
    used.update(entry.hf)
  missed = [p for p, _ in nnx.to_flat_state(state) if tuple(p) not in covered]
  assert not missed, f"parameter_mapping misses {_named(tuple(missed))}"
  extra = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
  if config.tie_embeddings:
    extra = [k for k in extra if k != "lm_head.weight"]  # some exporters store the tied copy
  if extra:
    raise ValueError(f"{path} has tensors this {family.name} config does not use: {sorted(extra)[:10]}")
  return nnx.merge(graphdef, state), config


def _export(model: Transformer, config: ModelConfig, path: str | Path, family: Family, dtype,
            max_shard_size: int | str | None) -> None:
  path = Path(path)
  hf_config = config_to_hf(config, family)
  hf_config["torch_dtype"] = jnp.dtype(dtype).name
  state = nnx.state(model)
  tensors, covered = {}, set()
  for entry in parameter_mapping(config, family):
    values = [_get(state, p)[...] for p in entry.jax]
    covered.update(entry.jax)
    if not entry.hf:
      if any(bool(jnp.any(v != 0)) for v in values):
        raise ValueError(f"{_named(entry.jax)} is nonzero, but {family.architecture} has no such parameter; "
                         "this model cannot be exported exactly.")
      continue
    for name, value in zip(entry.hf, entry.to_hf(values)):
      tensors[name] = jnp.asarray(value, dtype)
  missed = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)) if tuple(p) not in covered]
  assert not missed, f"parameter_mapping misses {_named(tuple(missed))}"
  path.mkdir(parents=True, exist_ok=True)
  _write_tensors(tensors, path, max_shard_size)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2))


def load_llama(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Llama checkpoint directory into a jaxlab Transformer."""
  return _load(path, LLAMA, dtype)


def export_llama(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32,
                 max_shard_size: int | str | None = None) -> None:
  """Writes ``config.json`` and safetensors that transformers' LlamaForCausalLM loads (one
  ``model.safetensors``, or shards of at most ``max_shard_size``, e.g. ``"5GB"``)."""
  _export(model, config, path, LLAMA, dtype, max_shard_size)


def load_mixtral(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Mixtral checkpoint (either expert layout of the module docstring)
  into a jaxlab Transformer with ``ffns=("moe",)``: softmax top-k renormalized over the k
  (``moe_renormalize=True``), dropless dispatch, expert width ``intermediate_size``, and a
  ``sliding_window`` if config.json sets one (Mixtral applies it in every layer).

  Training-only settings: ``router_jitter_noise`` is ignored (it acts only in training, and
  transformers multiplies the experts' input as well as the router's by it, unlike jaxlab's
  router-only ``moe_jitter``, so it is set to 0); ``router_aux_loss_coef`` becomes
  ``moe_aux_loss_weight`` (the same Switch loss up to normalization: transformers counts
  all k choices and pools the layers, and adds it only with ``output_router_logits``);
  transformers has no router z-loss, so ``moe_z_loss_weight=0``.
  """
  return _load(path, MIXTRAL, dtype)


def export_mixtral(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32,
                   max_shard_size: int | str | None = None) -> None:
  """Writes a checkpoint (per-expert layout) that transformers' MixtralForCausalLM loads.
  Needs every layer ``moe`` with renormalized softmax top-k routing, no shared experts,
  no attention biases. The dispatch is not part of the checkpoint: transformers computes
  every token, as ``moe_dispatch="dropless"`` does."""
  _export(model, config, path, MIXTRAL, dtype, max_shard_size)


def load_qwen2_moe(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Qwen2-MoE checkpoint into a jaxlab Transformer: softmax top-k,
  renormalized iff ``norm_topk_prob``; the shared expert of width
  ``shared_expert_intermediate_size`` is ``moe_shared_experts`` = that / ``moe_intermediate_size``
  (refused unless a multiple) with ``moe_shared_gate``; dense layers from ``mlp_only_layers`` /
  ``decoder_sparse_step`` become the shortest ``ffns`` pattern that repeats to them.

  Qwen2 has biases on q, k and v but not o; jaxlab's ``attention_bias`` has all four, so
  o's bias is loaded as zeros (exact) and `export_qwen2_moe` refuses it once nonzero: keep
  it frozen when fine-tuning a model meant to go back. Sliding-window attention maps only
  when every layer or none has it (``layer_types``). Training-only settings as in `load_mixtral`.
  """
  return _load(path, QWEN2_MOE, dtype)


def export_qwen2_moe(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32,
                     max_shard_size: int | str | None = None) -> None:
  """Writes a checkpoint (per-expert layout) that transformers' Qwen2MoeForCausalLM loads.
  Needs ``moe`` and ``mlp`` layers only, softmax top-k routing, a gated shared expert,
  and, with ``attention_bias``, a zero o-projection bias (Qwen2 has none)."""
  _export(model, config, path, QWEN2_MOE, dtype, max_shard_size)


def load_mamba(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Mamba checkpoint into a jaxlab Transformer with every layer
  ``mamba`` and ``ffns=("none",)`` (a Mamba block is ``x + mixer(norm(x))``). Fields that
  config.json omits take transformers' MambaConfig defaults (tied embeddings among them).
  ``use_conv_bias=False`` loads zero convolution biases (exact; exports then write
  ``use_conv_bias=True``); ``use_bias`` is ``model.ssm_bias``. Initialization-only settings
  (``time_step_scale``, ``time_step_floor``, ``time_step_init_scheme``,
  ``rescale_prenorm_residual``) are not kept; ``residual_in_fp32`` matters only below fp32
  (jaxlab's residual stream has ``dtype``)."""
  return _load(path, MAMBA, dtype)


def export_mamba(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32,
                 max_shard_size: int | str | None = None) -> None:
  """Writes a checkpoint that transformers' MambaForCausalLM loads. Needs every layer
  ``mamba`` without polarization, ``ffns=("none",)``, RMSNorm and no learned positions."""
  _export(model, config, path, MAMBA, dtype, max_shard_size)


def load_mamba2(path: str | Path, dtype=jnp.float32) -> tuple[Transformer, ModelConfig]:
  """Reads a Hugging Face Mamba-2 checkpoint into a jaxlab Transformer with every layer
  ``mamba2`` and ``ffns=("none",)``: ``n_groups`` is ``ssm_groups`` (for B and C and for the
  gated norm's groups), ``head_dim`` is ``ssm_head_dim`` (``num_heads`` must be expand x
  hidden_size / head_dim), ``chunk_size`` is ``ssm_chunk``. Omitted fields take Mamba2Config's
  defaults. A ``time_step_limit`` that clamps Δ is refused (jaxlab does not clamp);
  ``time_step_rank`` is unused by Mamba-2. Biases and the rest as in `load_mamba`."""
  return _load(path, MAMBA2, dtype)


def export_mamba2(model: Transformer, config: ModelConfig, path: str | Path, dtype=jnp.float32,
                  max_shard_size: int | str | None = None) -> None:
  """Writes a checkpoint that transformers' Mamba2ForCausalLM loads. Needs every layer
  ``mamba2``, ``ffns=("none",)``, RMSNorm and no learned positions."""
  _export(model, config, path, MAMBA2, dtype, max_shard_size)
