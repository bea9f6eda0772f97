"""A run's initial state: fresh from its seed, or made from another run's checkpoint.

``init.start_from=WORKDIR`` starts from the newest checkpoint of a run of the same model
(a fine-tuning run, or a ``jaxlab.merge`` output): its parameters and model state, with
this run's fresh optimizer at step 0. The run may extend the context (``rope_scaling``),
add LoRA adapters (the source's own adapters are merged when these differ) or turn RoPE
into TAPE: ``FINE_TUNING_FIELDS``.

``init.upcycle_from=WORKDIR`` upcycles the newest checkpoint of a dense run
(`jaxlab.growth.upcycle`) into this run's MoE model: parameters and optimizer moments
carried, the step and the learning-rate schedule started again, so this run trains for
its own ``train.steps`` on its own schedule.

``init.grow_from=WORKDIR`` grows the newest checkpoint of a smaller run into this run's
model with ``init.operator`` (`jaxlab.growth.grow`); for ``ligo`` the operator is first
trained on this run's data for ``init.ligo_steps`` steps (`jaxlab.train.grow`). The grown
run starts at step 0 with a fresh optimizer, as the papers' grown models do.

Either happens only when this run's workdir has no checkpoint yet: a resumed run never
starts from the other run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxlab.growth import LiGO, check_grow, check_upcycle, grow, upcycle
from jaxlab.growth.grow import WIDTHS
from jaxlab.growth.ligo import DEPTH_INITS, WIDTH_INITS
from jaxlab.growth.trees import abstract_params, by_name, differing_fields, rebuild
from jaxlab.growth.width import MAPPINGS
from jaxlab.nn import ModelConfig
from jaxlab.nn.lora import merged_by_name
from jaxlab.sharding import use_mesh
from jaxlab.train.checkpoint import Checkpointer, restore_target
from jaxlab.train.grow import fit_ligo
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import TrainState, abstract_train_state, create_train_state, state_shardings

log = logging.getLogger(__name__)


class SourceRun:
  """Another run's workdir: its config and its newest checkpoint."""

  def __init__(self, workdir: str | Path, field: str):
    self.workdir, self.field = Path(workdir), field
    config_path = self.workdir / "config.json"
    if not config_path.is_file():
      raise FileNotFoundError(f"{field}={str(workdir)!r} has no config.json; give the --workdir of a jaxlab run.")
    self.config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    self.model_config = ModelConfig.from_dict(self.config.model)
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=1 << 30)
    self.step = self.checkpointer.latest_step()
    if self.step is None:
      self.checkpointer.close()
      raise FileNotFoundError(f"{field}={str(workdir)!r} holds no checkpoint; train that run first.")

  def restore(self, mesh, rules) -> TrainState:
    """Its newest checkpoint's state, sharded over this run's mesh, verified."""
    tx, _ = make_optimizer(self.config.optim, self.config.train.steps, lora=self.model_config.lora_rank > 0)
    abstract = abstract_train_state(self.model_config, tx, self.config.seed)
    target = restore_target(abstract, state_shardings(abstract, mesh, rules))
    try:
      return self.checkpointer.restore(self.step, target, None)
    finally:
      self.checkpointer.close()


# What a run started from another (init.start_from) may set unlike its source: how the same
# parameters are computed, position interpolation, and additions that start as the identity
# (LoRA adapters, B = 0; TAPE from RoPE, which TAPE equals at initialization).
FINE_TUNING_FIELDS = ("attention_impl", "ssm_impl", "moe_gmm_impl", "remat", "rope_scaling",
                      "rope_scaling_factor", "lora_rank", "lora_alpha", "lora_targets", "positional")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def merges_source_lora(source: ModelConfig, target: ModelConfig) -> bool:
  """Whether the source's adapters are folded into its kernels before it is carried."""
  return source.lora_rank > 0 and any(getattr(source, f) != getattr(target, f) for f in LORA_FIELDS)


def check_fine_tuning(source: ModelConfig, target: ModelConfig, workdir: str) -> None:
  """Raises unless every parameter of ``source`` has a place of its shape in ``target``."""
  differ = differing_fields(source, target, allowed=FINE_TUNING_FIELDS)
  if source.positional != target.positional and (source.positional, target.positional) != ("rope", "tape"):
    differ.append(f"model.positional: {source.positional!r} -> {target.positional!r} (only 'rope' -> 'tape')")
  if differ:
    raise ValueError(f"init.start_from={workdir!r} is a run of another model; these fields differ "
                     "(set them as the source has them, or grow or upcycle it instead):\n  " + "\n  ".join(differ))
  carried = dataclasses.replace(source, lora_rank=0) if merges_source_lora(source, target) else source
  old, new = by_name(abstract_params(carried)), by_name(abstract_params(target))
  lost = [f"{n} {v.shape} -> {new[n].shape if n in new else 'absent'}" for n, v in old.items()
          if n not in new or new[n].shape != v.shape]
  if lost:
    raise ValueError(f"init.start_from={workdir!r}: these parameters have no place in this run's model:\n  "
                     + "\n  ".join(lost))


def check_init(config: ml_collections.ConfigDict, model_config: ModelConfig) -> SourceRun | None:
  """The run that ``config.init`` starts from (checked against this run's model), or None."""
  init = config.init
  starts = [f"init.{f}" for f in ("start_from", "upcycle_from", "grow_from") if init.get(f) is not None]
  if len(starts) > 1:
    raise ValueError(f"{' and '.join(starts)} are set together: a run starts from one other run.")
  if init.get("start_from") is not None:
    source = SourceRun(init.start_from, "init.start_from")
    check_fine_tuning(source.model_config, model_config, init.start_from)
    return source
  if init.upcycle_from is not None:
    source = SourceRun(init.upcycle_from, "init.upcycle_from")
    check_upcycle(source.model_config, model_config)
    return source
  if init.grow_from is not None:
    choices = {"init.width": (init.width, WIDTHS), "init.mapping": (init.mapping, MAPPINGS),
               "init.ligo_depth_init": (init.ligo_depth_init, DEPTH_INITS),
               "init.ligo_width_init": (init.ligo_width_init, WIDTH_INITS)}
    for field, (value, allowed) in choices.items():
      if value not in allowed:
        raise ValueError(f"{field}={value!r}: choose one of {allowed}")
    if init.ligo_steps < 1 and init.operator == "ligo":
      raise ValueError(f"init.ligo_steps={init.ligo_steps}: LiGO trains its operator for at least one step "
                       f"(the paper: 100)")
    source = SourceRun(init.grow_from, "init.grow_from")
    check_grow(source.model_config, model_config, init.operator)
    return source
  return None


def restart_schedule(opt_state: Any) -> Any:
  """The learning-rate schedule's step count set to zero; Adam's own count (its bias
  correction, which matches the carried moments) stays."""
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
  return jax.tree.map(lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
                      opt_state, is_leaf=is_schedule)


def _fine_tuned(setup, source: SourceRun, fresh: TrainState) -> TrainState:
  """This run's fresh state with every variable the source has (by path) taken from it;
  what only this run has (adapters, TAPE's maps) keeps its initialization."""
  merge = merges_source_lora(source.model_config, setup.model_config)

  def start(restored, fresh):
    params = by_name(restored.params)
    if merge:
      params = merged_by_name(params, source.model_config)
    old = {**params, **by_name(restored.model_state)}
    carry = lambda name, value: old.get(name, value)  # noqa: E731
    return fresh.replace(params=rebuild(fresh.params, carry), model_state=rebuild(fresh.model_state, carry))

  restored = source.restore(setup.mesh, setup.rules)
  return jax.jit(start, out_shardings=setup.shardings, donate_argnums=1)(restored, fresh)


def _upcycled(setup, source: SourceRun, fresh: TrainState) -> TrainState:
  seed = setup.config.seed
  dense = source.restore(setup.mesh, setup.rules)
  carried = jax.eval_shape(lambda s: upcycle(s, source.model_config, setup.model_config, seed=seed), dense)
  keep_optimizer = jax.tree.structure(carried.opt_state) == jax.tree.structure(fresh.opt_state)
  if not keep_optimizer:
    log.warning("the optimizer of %s differs from this run's (optim.trainable?): its state is not carried",
                source.workdir)

  def start(dense, fresh):
    state = upcycle(dense, source.model_config, setup.model_config, seed=seed)
    opt_state = restart_schedule(state.opt_state) if keep_optimizer else fresh.opt_state
    return fresh.replace(params=state.params, opt_state=opt_state, model_state=state.model_state)

  return jax.jit(start, out_shardings=setup.shardings, donate_argnums=1)(dense, fresh)


def _grown(setup, source: SourceRun, fresh: TrainState, batches) -> tuple[TrainState, dict[str, Any]]:
  init, seed = setup.config.init, setup.config.seed
  small = source.restore(setup.mesh, setup.rules).params
  report: dict[str, Any] = {"grow_from": str(source.workdir), "source_step": source.step, "operator": init.operator}
  if init.operator == "ligo":
    ligo = LiGO(source.model_config, setup.model_config, mapping=init.mapping, seed=seed,
                kronecker=init.ligo_kronecker)
    theta, report["ligo_loss"] = fit_ligo(ligo, small, fresh.model_state, setup, batches)
    report["ligo_steps"] = init.ligo_steps
    make = lambda small: ligo.apply(theta, small)  # noqa: E731
  else:
    make = lambda small: grow(small, source.model_config, setup.model_config, init.operator,  # noqa: E731
                              width=init.width, mapping=init.mapping, seed=seed, noise=init.noise)
  state = jax.jit(lambda small, fresh: fresh.replace(params=make(small)), out_shardings=setup.shardings,
                  donate_argnums=1)(small, fresh)
  return state, report


def initial_state(setup, source: SourceRun | None, batches=None) -> tuple[TrainState, dict[str, Any]]:
  """A fresh state, or the source run's state upcycled or grown, in this run's shardings,
  and a report of how it was made. ``batches``: this run's global training batches, which
  LiGO's operator training draws from."""
  with use_mesh(setup.mesh, setup.rules):
    fresh = create_train_state(setup.model_config, setup.tx, setup.config.seed, setup.shardings)
    if source is None:
      return fresh, {}
    if source.field == "init.start_from":
      log.info("starting from %s step %d", source.workdir, source.step)
      return _fine_tuned(setup, source, fresh), {"start_from": str(source.workdir), "source_step": source.step}
    if source.field == "init.upcycle_from":
      log.info("upcycling %s step %d into this run", source.workdir, source.step)
      return _upcycled(setup, source, fresh), {"upcycle_from": str(source.workdir), "source_step": source.step}
    log.info("growing %s step %d into this run with %s", source.workdir, source.step, setup.config.init.operator)
    return _grown(setup, source, fresh, batches)
