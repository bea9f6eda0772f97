"""ModelConfig: the architecture of a decoder-only LM, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

REMAT_POLICIES = ("none", "full", "save_dots")
NORMS = ("rmsnorm", "layernorm")
MLP_ACTIVATIONS = ("swiglu", "gelu")
POSITIONAL = ("rope", "alibi", "none", "learned", "tape")
ROPE_SCALINGS = (None, "linear", "ntk")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret", "cudnn")
ATTENTION_GATES = (None, "elementwise", "headwise")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters. Layer i uses ``mixers[i % len(mixers)]`` and
  ``ffns[i % len(ffns)]``, so ``mixers=("mamba", "mamba", "attention")`` makes a hybrid."""

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  mixers: tuple[str, ...] = ("attention",)
  ffns: tuple[str, ...] = ("mlp",)
  # attention
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA
  head_dim: int | None = None  # None: d_model // num_heads
  positional: str = "rope"  # rope | alibi | none (NoPE) | learned | tape
  rope_theta: float = 10_000.0
  rope_scaling: str | None = None  # None | linear | ntk
  rope_scaling_factor: float = 1.0
  max_position: int = 2048  # table size of learned absolute positions
  tape_position_size: int | None = None  # TAPE's hidden width over heads; None: 4 x num_heads
  attention_bias: bool = False
  attention_impl: str = "auto"  # auto (per platform) | xla | pallas | pallas_interpret | cudnn
  sliding_window: int | None = None  # attend to the w most recent positions, self included
  logit_soft_cap: float | None = None
  attention_gate: str | None = None  # None | elementwise | headwise (sigmoid output gate)
  # feed-forward
  mlp_dim: int = 1024
  mlp_activation: str = "swiglu"
  mlp_bias: bool = False
  # norms, embeddings, init
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  # memory
  remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "mixers", tuple(self.mixers))
    object.__setattr__(self, "ffns", tuple(self.ffns))
    _check_positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim")
    _check_choice(self, "norm", NORMS)
    _check_choice(self, "mlp_activation", MLP_ACTIVATIONS)
    _check_choice(self, "positional", POSITIONAL)
    _check_choice(self, "remat", REMAT_POLICIES)
    _check_choice(self, "rope_scaling", ROPE_SCALINGS)
    _check_choice(self, "attention_impl", ATTENTION_IMPLS)
    _check_choice(self, "attention_gate", ATTENTION_GATES)
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 1 (or None).")
    if self.logit_soft_cap is not None and self.logit_soft_cap <= 0:
      raise ValueError(f"model.logit_soft_cap={self.logit_soft_cap} must be > 0 (or None).")
    if self.rope_scaling is not None and self.rope_scaling_factor <= 0:
      raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be > 0.")
    if self.positional == "tape" and self.kv_heads != self.num_heads:
      raise ValueError(
          f"TAPE keeps position features per head: model.num_kv_heads={self.kv_heads} must "
          f"equal model.num_heads={self.num_heads} (set num_kv_heads=None)."
      )
    if self.attention_impl == "cudnn" and (self.logit_soft_cap or self.positional in ("alibi", "tape")):
      raise ValueError(
          "model.attention_impl='cudnn' supports neither logit_soft_cap nor ALiBi or TAPE; use "
          "attention_impl='pallas' or 'auto'."
      )
    if not self.mixers or not self.ffns:
      raise ValueError("model.mixers and model.ffns each need at least one entry.")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
          "set model.head_dim explicitly or pick num_heads dividing d_model."
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(
          f"model.num_kv_heads={self.kv_heads} does not divide model.num_heads={self.num_heads}; "
          "grouped-query attention needs num_heads to be a multiple of num_kv_heads."
      )
    if self.positional in ("rope", "tape") and self.dim_per_head % 2:
      raise ValueError(f"{self.positional} needs an even head_dim; got {self.dim_per_head}.")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def tape_width(self) -> int:
    return 4 * self.num_heads if self.tape_position_size is None else self.tape_position_size

  def mixer_of(self, layer: int) -> str:
    return self.mixers[layer % len(self.mixers)]

  def ffn_of(self, layer: int) -> str:
    return self.ffns[layer % len(self.ffns)]

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping (e.g. ``config.model`` of a ConfigDict)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
      raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**dict(fields))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_positive(config: ModelConfig, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"model.{name}={value!r} must be a positive integer.")


def _check_choice(config: ModelConfig, name: str, choices: tuple[str, ...]) -> None:
  value = getattr(config, name)
  if value not in choices:
    raise ValueError(f"model.{name}={value!r} is not supported; use one of {choices}.")
