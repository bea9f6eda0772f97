"""The width spaces of a jaxlab model: which axis of which parameter holds which units.

Growing a model's width adds units to its spaces: the residual stream (``embed``, one for
the whole model) and, per layer, attention heads (head width kept), key-value heads, MLP
neurons, experts and their neurons, an SSM's inner channels, heads and step-size rank,
TAPE's position features. Each parameter axis that holds units of a space is a
``Units``; its ``role`` says whether the tensor reads the units (``"in"``: a consumer,
where Net2Net divides by the copy count) or produces them or holds a value per unit
(``"out"``). An axis with ``None`` keeps its size; a tuple packs segments of units and
fixed-length parts (Mamba's ``x_proj`` output is [Δ rank | B | C]).

``output=True`` marks what a block writes into the residual stream (and TAPE's attention
gain, which writes into the position features): zeroing those makes the block an
identity map.
"""

from __future__ import annotations

import dataclasses
import re

from jaxlab.nn import ModelConfig
from jaxlab.nn.ssm import POLAR_STATES


@dataclasses.dataclass(frozen=True)
class Units:
  space: str
  role: str = "out"  # out | in
  size: int = 1  # elements per unit along the axis (a head's width on a flattened axis)


Axis = Units | int | tuple[Units | int, ...] | None


@dataclasses.dataclass(frozen=True)
class Rule:
  axes: tuple[Axis, ...]
  output: bool = False


GLOBAL_SPACES = ("embed",)
LAYER_SPACES = ("heads", "kv_heads", "group", "tape", "mlp", "expert", "expert_mlp", "shared_mlp", "inner",
                "dt_rank", "ssm_heads", "gla_heads")


def space_size(config: ModelConfig, space: str) -> int:
  """Units in ``space`` (``group``: query heads per key-value head)."""
  return {
      "embed": config.d_model, "heads": config.num_heads, "kv_heads": config.kv_heads,
      "group": config.num_heads // config.kv_heads, "tape": config.tape_width, "mlp": config.mlp_dim,
      "expert": config.moe_num_experts, "expert_mlp": config.expert_dim, "shared_mlp": config.shared_dim,
      "inner": config.ssm_inner, "dt_rank": config.dt_rank, "ssm_heads": config.ssm_heads,
      "gla_heads": config.gla_num_heads,
  }[space]


READ, WRITE = Units("embed", "in"), Units("embed")


def _mlp(space: str) -> dict[str, Rule]:
  hidden = Units(space)
  return {"up/kernel": Rule((READ, hidden)), "gate/kernel": Rule((READ, hidden)), "up/bias": Rule((hidden,)),
          "gate/bias": Rule((hidden,)), "down/kernel": Rule((Units(space, "in"), WRITE), output=True),
          "down/bias": Rule((WRITE,), output=True)}


def _attention(config: ModelConfig) -> dict[str, Rule]:
  heads, kv = Units("heads"), Units("kv_heads")
  gate = (READ, heads, None) if config.attention_gate == "elementwise" else (READ, heads)
  return {
      "q/kernel": Rule((READ, heads, None)), "k/kernel": Rule((READ, kv, None)), "v/kernel": Rule((READ, kv, None)),
      "q/bias": Rule((heads, None)), "k/bias": Rule((kv, None)), "v/bias": Rule((kv, None)),
      "o/kernel": Rule((Units("heads", "in"), None, WRITE), output=True), "o/bias": Rule((WRITE,), output=True),
      "gate/kernel": Rule(gate), "gate/bias": Rule(gate[1:]), "tape_gain": Rule((heads,), output=True),
  }


def _mamba(config: ModelConfig) -> dict[str, Rule]:
  inner, states = Units("inner"), config.state_size("mamba") + sum(POLAR_STATES[config.polarization])
  return {
      "in_proj/kernel": Rule((READ, None, inner)), "conv/kernel": Rule((None, inner)), "conv/bias": Rule((inner,)),
      "x_proj/kernel": Rule((Units("inner", "in"), (Units("dt_rank"), states, states))),
      "dt_proj": Rule((Units("dt_rank", "in"), inner)), "dt_bias": Rule((inner,)), "A_log": Rule((inner, None)),
      "D": Rule((inner,)), "out_proj/kernel": Rule((Units("inner", "in"), WRITE), output=True),
  }


def _mamba2(config: ModelConfig) -> dict[str, Rule]:
  heads, flat = Units("ssm_heads"), Units("ssm_heads", size=config.ssm_head_dim)
  return {
      "in_xz/kernel": Rule((READ, None, flat)), "in_bc/kernel": Rule((READ, None)), "in_dt/kernel": Rule((READ, heads)),
      "conv_x/kernel": Rule((None, flat)), "conv_x/bias": Rule((flat,)), "conv_bc/kernel": Rule((None, None)),
      "conv_bc/bias": Rule((None,)), "A_log": Rule((heads,)), "D": Rule((heads,)), "dt_bias": Rule((heads,)),
      "norm_scale": Rule((flat,)),
      "out_proj/kernel": Rule((Units("ssm_heads", "in", config.ssm_head_dim), WRITE), output=True),
  }


def _gla(config: ModelConfig) -> dict[str, Rule]:
  del config
  heads = Units("gla_heads")
  return {
      "q/kernel": Rule((READ, heads, None)), "k/kernel": Rule((READ, heads, None)),
      "v/kernel": Rule((READ, heads, None)), "gate/kernel": Rule((READ, heads, None)),
      "o/kernel": Rule((Units("gla_heads", "in"), None, WRITE), output=True),
      "forget_down/kernel": Rule((READ, None)), "forget_up/kernel": Rule((None, heads, None)),
      "forget_up/bias": Rule((heads, None)), "norm_scale": Rule((None,)),
  }


def _s4d(config: ModelConfig) -> dict[str, Rule]:
  """S4D runs one SSM per channel of the stream: its channels are ``embed`` units."""
  del config
  return {"log_dt": Rule((WRITE,)), "log_A_real": Rule((WRITE, None)), "A_imag": Rule((WRITE, None)),
          "C": Rule((WRITE, None, None)), "D": Rule((WRITE,)),
          "out_proj/kernel": Rule((READ, None, WRITE), output=True)}


def _moe() -> dict[str, Rule]:
  expert, hidden = Units("expert"), Units("expert_mlp")
  return {
      "router/kernel": Rule((READ, expert)), "experts/up": Rule((expert, READ, hidden)),
      "experts/gate": Rule((expert, READ, hidden)),
      "experts/down": Rule((expert, Units("expert_mlp", "in"), WRITE), output=True),
      "shared_gate/kernel": Rule((READ, None)),
      **{f"shared/{name}": rule for name, rule in _mlp("shared_mlp").items()},
  }


def _tape() -> dict[str, Rule]:
  return {"up": Rule((Units("heads", "in"), Units("tape"))), "x_proj/kernel": Rule((READ, Units("tape"))),
          "down": Rule((Units("tape", "in"), Units("heads")))}


MIXERS = {"attention": _attention, "mamba": _mamba, "mamba2": _mamba2, "gla": _gla, "s4d": _s4d}
LAYER = re.compile(r"blocks/(\d+)/(.+)")
BLOCK = re.compile(r"blocks/(\d+)/(mixer|ffn|tape|mixer_norm|ffn_norm)/(.+)")


def rule(config: ModelConfig, name: str) -> Rule:
  """The rule for parameter ``name`` ("blocks/3/mixer/q/kernel") of a model of ``config``."""
  block = BLOCK.fullmatch(name)
  if block:
    layer, part, rest = int(block.group(1)), block.group(2), block.group(3)
    if part in ("mixer_norm", "ffn_norm"):
      table = {"scale": Rule((WRITE,)), "bias": Rule((WRITE,))}
    elif part == "tape":
      table = _tape()
    elif part == "ffn":
      table = _moe() if config.ffn_of(layer) == "moe" else _mlp("mlp")
    else:
      table = MIXERS[config.mixer_of(layer)](config)
  elif name.startswith("pregate/"):
    return Rule(())  # the pre-gating router reads token ids only: never widened
  else:
    # The final norm feeds only the head; a tied head reads the copied embedding table,
    # so the final norm takes the consumer's side (Net2Net's division) for it.
    final = READ if config.tie_embeddings else WRITE
    table = {"embed/table": Rule((None, WRITE)), "positions/table": Rule((None, WRITE)),
             "abacus/table": Rule((None, WRITE)),
             "lm_head/kernel": Rule((READ, None)), "final_norm/scale": Rule((final,)),
             "final_norm/bias": Rule((final,))}
    rest = name
  if rest not in table:
    raise KeyError(f"no growth rule for parameter {name!r}: add its axes to jaxlab/growth/spaces.py")
  return table[rest]
