"""Growth operators: a small model's trained parameters as the initial parameters of a
larger one (more layers, a wider stream, more heads, neurons, experts, SSM channels).

``grow(params, config, target_config, operator)`` with

- ``stack``: StackBERT / G_stack (Gong et al., ICML 2019; Du et al., NeurIPS 2024):
  large layer i is small layer i mod L1, the whole stack repeated on top of itself;
- ``interleave``: large layer i is small layer ⌊i L1 / L2⌋ (each layer repeated in place);
- ``identity``: depth only; the new layers are inserted after the layer they copy, with
  what they write into the stream zeroed (`spaces.Rule.output`), so each is an identity
  map at first and the grown model computes the small one's function exactly;
- ``net2net``: Net2WiderNet for width and Net2DeeperNet for depth (Chen et al., ICLR
  2016): identity layers as above, the width by copying units (`width.UnitMap`);
- ``bert2bert``: bert2BERT's function-preserving initialization (Chen et al., ACL 2022):
  Net2Net's width on every module, heads as units, then depth by stacking;
- ``aki``: bert2BERT's advanced knowledge initialization: as ``bert2bert``, but the new
  units of a layer (heads, neurons, channels) take their weights from the small model's
  next layer of the same kind (the top layer from itself);
- ``ligo``: the learned operator (`jaxlab.growth.ligo`); pass its trained parameters as
  ``ligo_params`` (without them: its initialization).

``stack`` and ``interleave`` widen with Net2Net's copies (``width="net2net"``, default)
or plain copies (``width="copy"``, which a one-hot LiGO reproduces). Which widths are
exact is in `jaxlab.growth.width`. Non-parameter model state (a router's balancing bias)
is not grown: the large model's starts fresh.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.growth import spaces
from jaxlab.growth.depth import DEPTH, donor_layer, layer_sources
from jaxlab.growth.ligo import LiGO
from jaxlab.growth.trees import abstract_params, by_name, differing_fields, rebuild
from jaxlab.growth.width import MAPPINGS, WidthPlan, copy_units, new_unit_mask
from jaxlab.nn import ModelConfig

OPERATORS = ("ligo", "stack", "interleave", "net2net", "bert2bert", "aki", "identity")
WIDTHS = ("net2net", "copy")
GROWABLE = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "moe_num_experts",
            "moe_expert_dim", "moe_shared_experts", "moe_shared_dim", "ssm_expand", "ssm_dt_rank", "gla_heads",
            "tape_position_size", "mixers", "ffns")


def check_grow(config: ModelConfig, target: ModelConfig, operator: str) -> None:
  """Raises ValueError naming what keeps ``config`` from growing into ``target``."""
  if operator not in OPERATORS:
    raise ValueError(f"operator={operator!r}: choose one of {OPERATORS}")
  differ = differing_fields(config, target, allowed=GROWABLE)
  if differ:
    raise ValueError("growth changes only sizes (" + ", ".join(GROWABLE) + "); these fields differ:\n  "
                     + "\n  ".join(differ))
  problems = []
  attention = any(target.mixer_of(i) == "attention" for i in range(target.num_layers))
  if attention and config.dim_per_head != target.dim_per_head:
    problems.append(f"attention heads are units of a fixed width: the head width {config.dim_per_head} -> "
                    f"{target.dim_per_head} (set model.head_dim, or grow num_heads with d_model)")
  if any(target.mixer_of(i) == "gla" for i in range(target.num_layers)):
    head = lambda c, what: getattr(c, f"gla_{what}_dim") // c.gla_num_heads  # noqa: E731
    for what in ("key", "value"):
      small, large = head(config, what), head(target, what)
      if small != large:
        problems.append(f"GLA heads are units of a fixed width: the {what} head width {small} -> {large} "
                        f"(grow model.gla_heads with d_model)")
  if "moe" in target.ffns and config.shared_dim == 0 and target.shared_dim > 0:
    problems.append("the small model has no shared expert to grow (model.moe_shared_experts)")
  if target.pregated and config.moe_num_experts != target.moe_num_experts:
    problems.append("the pre-gating router's choices index the experts: keep model.moe_num_experts")
  for space in spaces.GLOBAL_SPACES + spaces.LAYER_SPACES:
    if spaces.space_size(target, space) < spaces.space_size(config, space):
      problems.append(f"{space}: {spaces.space_size(config, space)} -> {spaces.space_size(target, space)} units "
                      f"(growth never removes units)")
  if operator == "identity" and any(spaces.space_size(config, s) != spaces.space_size(target, s)
                                    for s in spaces.GLOBAL_SPACES + spaces.LAYER_SPACES):
    problems.append("identity insertion grows depth only; use net2net to widen as well")
  if problems:
    raise ValueError(f"cannot grow with {operator}:\n  " + "\n  ".join(problems))
  layer_sources(config, target, DEPTH[operator])


def grow(params: nnx.State, config: ModelConfig, target_config: ModelConfig, operator: str, *,
         width: str = "net2net", mapping: str = "random", seed: int = 0, noise: float = 0.0,
         ligo_params: dict | None = None) -> nnx.State:
  """``params`` (an ``nnx.State`` of the small model's parameters) as the parameters of
  ``target_config``. ``mapping``: Net2Net's random choice of copied units, or ``cyclic``;
  ``noise``: Net2Net's symmetry-breaking noise on the new units, as a fraction of each
  tensor's standard deviation. Works under ``jax.jit`` with the large model's shardings."""
  if hasattr(params, "opt_state"):
    raise TypeError("grow takes parameters: pass train_state.params (a grown run starts a fresh optimizer)")
  check_grow(config, target_config, operator)
  if operator == "ligo":
    ligo = LiGO(config, target_config, mapping=mapping, seed=seed)
    return ligo.apply(ligo.init() if ligo_params is None else ligo_params, params)
  if width not in WIDTHS or mapping not in MAPPINGS:
    raise ValueError(f"width={width!r}, mapping={mapping!r}: choose width in {WIDTHS}, mapping in {MAPPINGS}")
  divide = operator in ("net2net", "bert2bert", "aki") or width == "net2net"
  plan = WidthPlan(config, target_config, mapping, seed)
  sources = layer_sources(config, target_config, DEPTH[operator])
  small = by_name(params)
  key = jax.random.key(seed)

  def value(name: str, like: jax.ShapeDtypeStruct) -> jax.Array:
    rule = spaces.rule(target_config, name)
    layer, source_name, zero, donor = None, name, False, None
    match = spaces.LAYER.fullmatch(name)
    if match:
      layer, rest = int(match.group(1)), match.group(2)
      source, zero = sources[layer]
      source_name = f"blocks/{source}/{rest}"
      if operator == "aki":
        donor = f"blocks/{donor_layer(config, source)}/{rest}"
    maps = plan.maps(layer)
    out = copy_units(small[source_name], rule.axes, maps, divide=divide)
    if donor is not None:
      mask = new_unit_mask(small[source_name], rule.axes, maps, spaces.LAYER_SPACES)
      out = jnp.where(mask, copy_units(small[donor], rule.axes, maps, divide=divide), out)
    if noise:
      mask = new_unit_mask(small[source_name], rule.axes, maps, spaces.GLOBAL_SPACES + spaces.LAYER_SPACES)
      draw = jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), out.shape, out.dtype)
      out = out + mask * noise * jnp.std(small[source_name]) * draw
    if zero and rule.output:
      out = jnp.zeros_like(out)
    if out.shape != like.shape:
      raise AssertionError(f"{name}: grown to {out.shape}, the target has {like.shape} (jaxlab/growth/spaces.py)")
    return out.astype(like.dtype)

  return rebuild(abstract_params(target_config), value)


def new_layers(config: ModelConfig, target: ModelConfig, operator: str) -> str:
  """A regular expression (for ``optim.trainable``) matching the large model's layers
  that are not the small model's own: MSLT trains only these at first (Yang et al.)."""
  sources, seen = layer_sources(config, target, DEPTH[operator]), set()
  fresh = []
  for i, (s, _) in enumerate(sources):
    (fresh.append(i) if s in seen else seen.add(s))
  if not fresh:
    raise ValueError("the large model has no new layers")
  return r"^blocks/(" + "|".join(map(str, fresh)) + r")/"

