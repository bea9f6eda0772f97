"""ModelConfig: the architecture of a decoder-only LM, validated on construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jaxlab import checks

REMAT_POLICIES = ("none", "full", "save_dots")
NORMS = ("rmsnorm", "layernorm")
MLP_ACTIVATIONS = ("swiglu", "gelu")
POSITIONAL = ("rope", "alibi", "none", "learned", "tape")
ROPE_SCALINGS = (None, "linear", "ntk")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret", "cudnn")
ATTENTION_GATES = (None, "elementwise", "headwise")
SSM_IMPLS = ("auto", "sequential", "associative", "xla", "pallas", "pallas_interpret")
POLARIZATIONS = (None, "both", "one", "zero")
S4D_INITS = ("lin", "inv", "real")
MOE_ROUTERS = ("topk", "sigmoid", "expert_choice", "dense_to_sparse", "pregate")
MOE_DTS_GATES = ("gumbel", "activation")
MOE_DTS_ACTIVATIONS = ("identity", "tanh", "sigmoid", "gelu")
MOE_DTS_SCHEDULES = ("linear", "cosine")
MOE_GATE_ORDERS = ("softmax_topk", "topk_softmax")
MOE_DISPATCHES = ("dropless", "capacity")
MOE_GMM_IMPLS = ("auto", "xla", "ragged_dot", "pallas", "pallas_interpret", "reference")
BLOCK_ROUTERS = ("layer", "model")
BLOCK_POOLERS = ("first_token", "mean")
DEFAULT_STATE = {"mamba": 16, "mamba2": 128, "s4d": 64}  # the source papers' defaults


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
  # Abacus digit positions (McLeish et al. 2024), added to the token embeddings with any `positional`
  abacus: bool = False
  abacus_digit_tokens: tuple[int, int] = (0, 9)  # first and last token id of the digits 0-9
  abacus_max_offset: int = 100  # training shifts digit indices by k ~ U{0..this}, one k a step
  abacus_max_digits: int = 32  # longest number with its own index at test time (offset 0)
  tape_position_size: int | None = None  # TAPE's hidden width over heads; None: 4 x num_heads
  attention_bias: bool = False
  attention_impl: str = "auto"  # auto (per platform) | xla | pallas | pallas_interpret | cudnn
  sliding_window: int | None = None  # attend to the w most recent positions, self included
  logit_soft_cap: float | None = None
  attention_gate: str | None = None  # None | elementwise | headwise (sigmoid output gate)
  # state space mixers: mamba (Gu & Dao 2023), mamba2 (Dao & Gu 2024), s4d (Gu et al. 2022)
  ssm_state: int | None = None  # state size N per channel/head; None: 16 mamba, 128 mamba2, 64 s4d
  ssm_expand: int = 2  # inner width = ssm_expand x d_model
  ssm_conv: int = 4  # causal depthwise convolution width
  ssm_dt_rank: int | None = None  # mamba's low-rank step-size projection; None: ceil(d_model / 16)
  ssm_dt_min: float = 1e-3  # initial step sizes are log-uniform in [ssm_dt_min, ssm_dt_max]
  ssm_dt_max: float = 0.1
  ssm_head_dim: int = 64  # mamba2 head width P
  ssm_groups: int = 1  # mamba2 groups of heads sharing B and C
  ssm_chunk: int = 64  # chunk length of the chunked scans of mamba2 and gla
  ssm_bias: bool = False  # mamba, mamba2: biases on the input and output projections (transformers' use_bias)
  ssm_impl: str = "auto"  # auto | sequential | associative (mamba only) | xla | pallas | pallas_interpret
  polarization: str | None = None  # mamba: None | both | one (A = 0 state) | zero (forgetting state)
  # A of the forgetting state: -100 as SSM-Bottleneck's code (Ā = exp(-100 Δ): 0.90 at Δ = 1e-3);
  # None for A = -inf (Ā = 0: only the current input, no scan)
  polarization_zero_A: float | None = -100.0
  s4d_init: str = "lin"  # S4D-Lin | S4D-Inv | S4D-Real
  # gated linear attention (Yang et al. 2024, fla's GatedLinearAttention layer)
  gla_heads: int | None = None  # None: num_heads
  gla_expand_k: float = 0.5
  gla_expand_v: float = 1.0
  gla_gate_rank: int = 16  # low-rank forget-gate projection
  gla_gate_normalizer: float = 16.0  # log g = logsigmoid(.) / normalizer
  # feed-forward
  mlp_dim: int = 1024
  mlp_activation: str = "swiglu"
  mlp_bias: bool = False
  # mixture of experts (ffns "moe"; jaxlab/nn/moe.py)
  moe_num_experts: int = 8
  moe_top_k: int = 2
  moe_expert_dim: int | None = None  # each expert's hidden width; None: mlp_dim
  moe_shared_experts: int = 0  # experts every token uses (DeepSeek-MoE), one MLP of their total width
  moe_shared_dim: int | None = None  # the shared MLP's width; None: moe_shared_experts x expert width
  moe_shared_gate: bool = False  # a sigmoid gate on the shared experts' output (Qwen-MoE)
  # topk | sigmoid (DeepSeek-V3) | expert_choice (Zhou et al.) | dense_to_sparse | pregate (Read-ME)
  moe_router: str = "topk"
  moe_gate_order: str = "softmax_topk"  # softmax over all experts, then top-k | topk_softmax
  moe_renormalize: bool = True  # gates of the k chosen experts sum to 1 (Mixtral)
  moe_dispatch: str = "dropless"  # dropless (sorted grouped matmuls) | capacity (GShard)
  moe_capacity_factor: float = 1.25  # capacity per expert and sequence: factor x k x t / E
  moe_aux_loss_weight: float = 1e-2  # Switch load-balancing loss
  moe_z_loss_weight: float = 1e-3  # ST-MoE router z-loss
  moe_jitter: float = 0.0  # multiplicative router-input noise U(1 - eps, 1 + eps) in training
  moe_bias_update_rate: float = 1e-3  # sigmoid router: DeepSeek-V3's balancing-bias step
  moe_gmm_impl: str = "auto"  # grouped matmul: auto | xla | ragged_dot | pallas | pallas_interpret | reference
  # dense-to-sparse routers (moe_router="dense_to_sparse"; jaxlab/nn/dense_to_sparse.py)
  moe_dts_gate: str = "gumbel"  # gumbel (EvoMoE, Nie et al.) | activation (Nguyen et al. 2024)
  moe_dts_activation: str = "tanh"  # the activation gate's σ: identity | tanh | sigmoid | gelu
  moe_dts_max_temperature: float = 2.0  # EvoMoE's WMT settings: 2.0 -> 0.5 over 5k steps, hard at 6k
  moe_dts_min_temperature: float = 0.5
  moe_dts_decay_steps: int = 5000
  moe_dts_schedule: str = "linear"  # linear | cosine
  moe_dts_switch_step: int = 6000  # from this step on only the top-k gates are kept
  moe_dts_threshold: float = 0.02  # gates at or under it are masked (EvoMoE's GUMBEL_THRESHOLD)
  # Read-ME's pre-gating router (moe_router="pregate"; jaxlab/nn/pregate.py): a causal transformer on token ids
  moe_pregate_dim: int = 64
  moe_pregate_layers: int = 1
  moe_pregate_heads: int = 4
  # block mixtures (Model-GLUE's block- and model-level MoE; jaxlab/nn/block_mixture.py): whole blocks as experts
  block_experts: int = 0  # blocks per layer from block_dense_layers on, a router picking top-k per sequence; 0: none
  block_dense_layers: int = 0  # the first layers stay single blocks (Model-GLUE's hybrid)
  block_top_k: int = 1
  block_router: str = "layer"  # layer (a router per layer: block level) | model (one router for all: model level)
  block_pooler: str = "first_token"  # what the router reads: first_token (causal) | mean (the whole sequence)
  # norms, embeddings, init
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  # low-rank adaptation (jaxlab/nn/lora.py); 0: none
  lora_rank: int = 0
  lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
  lora_targets: str = r"mixer/(q|v)$"  # regex over dense-layer paths; the paper's W_q and W_v
  # memory
  remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "mixers", tuple(self.mixers))
    object.__setattr__(self, "ffns", tuple(self.ffns))
    object.__setattr__(self, "abacus_digit_tokens", tuple(self.abacus_digit_tokens))
    _check_positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim")
    _check_choice(self, "norm", NORMS)
    _check_choice(self, "mlp_activation", MLP_ACTIVATIONS)
    _check_choice(self, "positional", POSITIONAL)
    if self.abacus:
      _check_abacus(self)
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
    _check_choice(self, "ssm_impl", SSM_IMPLS)
    _check_choice(self, "polarization", POLARIZATIONS)
    _check_choice(self, "s4d_init", S4D_INITS)
    self._check_lora()
    self._check_recurrent_mixers()
    self._check_moe()
    self._check_block_mixture()
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

  def _check_lora(self) -> None:
    if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      raise ValueError(f"model.lora_rank={self.lora_rank!r} must be an integer >= 0 (0: no LoRA).")
    if self.lora_rank and not self.lora_alpha > 0:
      raise ValueError(f"model.lora_alpha={self.lora_alpha} must be > 0 (the update is scaled by alpha / rank).")
    try:
      re.compile(self.lora_targets)
    except re.error as e:
      raise ValueError(f"model.lora_targets={self.lora_targets!r} is not a regular expression: {e}") from None

  def _check_recurrent_mixers(self) -> None:
    mixers = set(self.mixers)
    if self.ssm_state is not None:
      _check_positive(self, "ssm_state")
    _check_positive(self, "ssm_expand", "ssm_conv", "ssm_head_dim", "ssm_groups", "ssm_chunk", "gla_gate_rank")
    if self.positional == "tape" and mixers != {"attention"}:
      raise ValueError(f"TAPE carries position features through attention layers only; model.mixers="
                       f"{self.mixers} has others. Use positional='rope' or 'none' for hybrids.")
    if self.positional == "tape" and "none" in self.ffns:
      raise ValueError("TAPE updates positions from the FFN output; model.ffns may not contain 'none'.")
    if self.polarization is not None and "mamba" not in mixers:
      raise ValueError(f"model.polarization={self.polarization!r} applies to 'mamba' mixers; model.mixers="
                       f"{self.mixers} has none.")
    if self.polarization_zero_A is not None and not self.polarization_zero_A < 0:
      raise ValueError(f"model.polarization_zero_A={self.polarization_zero_A} must be negative (the official "
                       "-100.0), or None for A = -inf.")
    if self.ssm_impl == "associative" and mixers & {"mamba2", "gla"}:
      raise ValueError("model.ssm_impl='associative' exists for 'mamba' only; use 'xla' (chunked) for "
                       "mamba2 and gla.")
    if self.ssm_dt_rank is not None and self.ssm_dt_rank < 1:
      raise ValueError(f"model.ssm_dt_rank={self.ssm_dt_rank} must be >= 1 (or None).")
    if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
      raise ValueError(f"need 0 < model.ssm_dt_min ({self.ssm_dt_min}) <= model.ssm_dt_max ({self.ssm_dt_max}).")
    if "mamba2" in mixers:
      if self.ssm_inner % self.ssm_head_dim:
        raise ValueError(f"mamba2: inner width ssm_expand x d_model = {self.ssm_inner} is not divisible by "
                         f"model.ssm_head_dim={self.ssm_head_dim}; pick a head_dim that divides it.")
      if self.ssm_heads % self.ssm_groups:
        raise ValueError(f"mamba2: {self.ssm_heads} heads are not divisible by model.ssm_groups="
                         f"{self.ssm_groups}; pick groups dividing the head count.")
    if "s4d" in mixers and self.state_size("s4d") % 2:
      raise ValueError(f"s4d keeps N/2 complex-conjugate pairs: model.ssm_state={self.ssm_state} must be even.")
    if "gla" in mixers:
      if self.ssm_chunk < 16 or self.ssm_chunk & (self.ssm_chunk - 1):
        raise ValueError(f"gla: model.ssm_chunk={self.ssm_chunk} must be a power of two >= 16 (e.g. 64).")
      for name, width in (("gla_expand_k", self.gla_key_dim), ("gla_expand_v", self.gla_value_dim)):
        if width < 1 or width != getattr(self, name) * self.d_model or width % self.gla_num_heads:
          raise ValueError(f"gla: model.{name}={getattr(self, name)} x d_model={self.d_model} must be an "
                           f"integer divisible by {self.gla_num_heads} heads (model.gla_heads).")

  def _check_moe(self) -> None:
    if "moe" not in self.ffns:
      return
    _check_positive(self, "moe_num_experts", "moe_top_k")
    if self.moe_expert_dim is not None:
      _check_positive(self, "moe_expert_dim")
    checks.nonnegative_int("model.moe_shared_experts", self.moe_shared_experts)
    if self.moe_shared_dim is not None:
      checks.nonnegative_int("model.moe_shared_dim", self.moe_shared_dim)
    _check_choice(self, "moe_router", MOE_ROUTERS)
    _check_choice(self, "moe_gate_order", MOE_GATE_ORDERS)
    _check_choice(self, "moe_dispatch", MOE_DISPATCHES)
    _check_choice(self, "moe_gmm_impl", MOE_GMM_IMPLS)
    if self.moe_top_k > self.moe_num_experts:
      raise ValueError(f"model.moe_top_k={self.moe_top_k} exceeds model.moe_num_experts="
                       f"{self.moe_num_experts}; pick top_k <= the number of experts.")
    if not self.moe_capacity_factor > 0:
      raise ValueError(f"model.moe_capacity_factor={self.moe_capacity_factor} must be > 0 "
                       "(1.0-1.25 is usual; large values drop nothing).")
    if not 0 <= self.moe_jitter < 1:
      raise ValueError(f"model.moe_jitter={self.moe_jitter} must be in [0, 1) (Switch uses 0.01).")
    if self.moe_shared_gate and not self.shared_dim:
      raise ValueError("model.moe_shared_gate=True gates shared experts, but model.moe_shared_experts=0.")
    if self.moe_router == "dense_to_sparse":
      self._check_dense_to_sparse()
    if self.moe_router == "pregate":
      self._check_pregate()

  def _check_block_mixture(self) -> None:
    checks.nonnegative_int("model.block_experts", self.block_experts)
    if not self.block_experts:
      return
    if self.block_experts < 2:
      raise ValueError(f"model.block_experts={self.block_experts}: a block mixture needs at least 2 expert blocks "
                       "per layer (0 turns it off).")
    _check_choice(self, "block_router", BLOCK_ROUTERS)
    _check_choice(self, "block_pooler", BLOCK_POOLERS)
    if not 1 <= self.block_top_k <= self.block_experts:
      raise ValueError(f"model.block_top_k={self.block_top_k}: choose between 1 and model.block_experts="
                       f"{self.block_experts}.")
    if not 0 <= self.block_dense_layers < self.num_layers:
      raise ValueError(f"model.block_dense_layers={self.block_dense_layers}: keep between 0 and "
                       f"{self.num_layers - 1} of the {self.num_layers} layers single blocks.")
    if self.positional == "tape" or self.pregated:
      raise ValueError("a block mixture routes whole sequences through separate blocks, which neither TAPE's "
                       "position features nor a pre-gating router (model.moe_router='pregate') can follow; "
                       "set model.block_experts=0 or use another positional encoding / router.")

  def is_block_mixture(self, layer: int) -> bool:
    """Whether layer ``layer`` holds ``block_experts`` whole blocks (`jaxlab.nn.block_mixture`)."""
    return self.block_experts > 0 and layer >= self.block_dense_layers

  def _check_pregate(self) -> None:
    _check_positive(self, "moe_pregate_dim", "moe_pregate_layers", "moe_pregate_heads")
    if self.moe_pregate_dim % self.moe_pregate_heads:
      raise ValueError(f"model.moe_pregate_dim={self.moe_pregate_dim} is not divisible by "
                       f"model.moe_pregate_heads={self.moe_pregate_heads}.")
    if self.moe_top_k != 1 or self.moe_dispatch != "dropless":
      raise ValueError(f"model.moe_router='pregate' sends each token to its one pre-gated expert: set "
                       f"model.moe_top_k=1 and moe_dispatch='dropless' (got {self.moe_top_k}, {self.moe_dispatch!r}).")

  def _check_dense_to_sparse(self) -> None:
    _check_choice(self, "moe_dts_gate", MOE_DTS_GATES)
    _check_choice(self, "moe_dts_activation", MOE_DTS_ACTIVATIONS)
    _check_choice(self, "moe_dts_schedule", MOE_DTS_SCHEDULES)
    _check_positive(self, "moe_dts_decay_steps")
    checks.nonnegative_int("model.moe_dts_switch_step", self.moe_dts_switch_step)
    if not 0 < self.moe_dts_min_temperature <= self.moe_dts_max_temperature:
      raise ValueError(f"need 0 < model.moe_dts_min_temperature ({self.moe_dts_min_temperature}) <= "
                       f"model.moe_dts_max_temperature ({self.moe_dts_max_temperature}).")
    if not 0 <= self.moe_dts_threshold < 1:
      raise ValueError(f"model.moe_dts_threshold={self.moe_dts_threshold} must be in [0, 1) (EvoMoE: 0.02).")
    if self.moe_dispatch != "dropless":
      raise ValueError(f"model.moe_router='dense_to_sparse' weights every expert before its switch step, "
                       f"which a capacity cannot hold; set model.moe_dispatch='dropless' (got "
                       f"{self.moe_dispatch!r}).")

  @property
  def expert_dim(self) -> int:
    return self.mlp_dim if self.moe_expert_dim is None else self.moe_expert_dim

  @property
  def pregated(self) -> bool:
    """Whether a pre-gating router (Read-ME) picks the MoE layers' experts."""
    return "moe" in self.ffns and self.moe_router == "pregate"

  @property
  def shared_dim(self) -> int:
    """The width of the MLP every token of a MoE layer uses (0: none)."""
    return self.moe_shared_experts * self.expert_dim if self.moe_shared_dim is None else self.moe_shared_dim

  @property
  def ssm_inner(self) -> int:
    return self.ssm_expand * self.d_model

  @property
  def ssm_heads(self) -> int:
    return self.ssm_inner // self.ssm_head_dim

  @property
  def dt_rank(self) -> int:
    return -(-self.d_model // 16) if self.ssm_dt_rank is None else self.ssm_dt_rank

  def state_size(self, mixer: str) -> int:
    return DEFAULT_STATE[mixer] if self.ssm_state is None else self.ssm_state

  @property
  def gla_num_heads(self) -> int:
    return self.num_heads if self.gla_heads is None else self.gla_heads

  @property
  def gla_key_dim(self) -> int:
    return round(self.gla_expand_k * self.d_model)

  @property
  def gla_value_dim(self) -> int:
    return round(self.gla_expand_v * self.d_model)

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
    checks.positive_int(f"model.{name}", getattr(config, name))


def _check_abacus(config: ModelConfig) -> None:
  first, last = config.abacus_digit_tokens
  if not 0 <= first <= last < config.vocab_size or last - first != 9:
    raise ValueError(f"model.abacus_digit_tokens={config.abacus_digit_tokens} must be the first and last id of the "
                     f"ten digit tokens 0-9 (last = first + 9) inside the vocabulary of {config.vocab_size}.")
  if config.abacus_max_offset < 0 or config.abacus_max_digits < 1:
    raise ValueError(f"model.abacus_max_offset={config.abacus_max_offset} must be >= 0 and "
                     f"model.abacus_max_digits={config.abacus_max_digits} >= 1.")


def _check_choice(config: ModelConfig, name: str, choices: tuple[str | None, ...]) -> None:
  checks.choice(f"model.{name}", getattr(config, name), choices)
