"""A run's initial state: fresh from its seed, or made from another run's checkpoint.

``init.upcycle_from=WORKDIR`` upcycles the newest checkpoint of a dense run
(`jaxlab.growth.upcycle`) into this run's MoE model: parameters and optimizer moments
carried, the step and the learning-rate schedule started again, so this run trains for
its own ``train.steps`` on its own schedule. It happens only when this run's workdir has
no checkpoint yet: a resumed run never starts from the other run again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxlab.growth import check_upcycle, upcycle
from jaxlab.nn import ModelConfig
from jaxlab.sharding import use_mesh
from jaxlab.train.checkpoint import Checkpointer, restore_target
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
    tx, _ = make_optimizer(self.config.optim, self.config.train.steps)
    abstract = abstract_train_state(self.model_config, tx, self.config.seed)
    target = restore_target(abstract, state_shardings(abstract, mesh, rules))
    try:
      return self.checkpointer.restore(self.step, target, None)
    finally:
      self.checkpointer.close()


def check_init(config: ml_collections.ConfigDict, model_config: ModelConfig) -> SourceRun | None:
  """The run that ``config.init`` starts from (checked against this run's model), or None."""
  if config.init.upcycle_from is None:
    return None
  source = SourceRun(config.init.upcycle_from, "init.upcycle_from")
  check_upcycle(source.model_config, model_config)
  return source


def restart_schedule(opt_state: Any) -> Any:
  """The learning-rate schedule's step count set to zero; Adam's own count (its bias
  correction, which matches the carried moments) stays."""
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
  return jax.tree.map(lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
                      opt_state, is_leaf=is_schedule)


def initial_state(setup, source: SourceRun | None) -> TrainState:
  """A fresh state, or the source run's state upcycled, in this run's shardings."""
  config = setup.config
  with use_mesh(setup.mesh, setup.rules):
    fresh = create_train_state(setup.model_config, setup.tx, config.seed, setup.shardings)
    if source is None:
      return fresh
    log.info("upcycling %s step %d into this run", source.workdir, source.step)
    dense = source.restore(setup.mesh, setup.rules)
    carried = jax.eval_shape(lambda s: upcycle(s, source.model_config, setup.model_config, seed=config.seed), dense)
    keep_optimizer = jax.tree.structure(carried.opt_state) == jax.tree.structure(fresh.opt_state)
    if not keep_optimizer:
      log.warning("the optimizer of %s differs from this run's (optim.trainable?): its state is not carried",
                  source.workdir)

    def start(dense, fresh):
      state = upcycle(dense, source.model_config, setup.model_config, seed=config.seed)
      opt_state = restart_schedule(state.opt_state) if keep_optimizer else fresh.opt_state
      return fresh.replace(params=state.params, opt_state=opt_state, model_state=state.model_state)

    return jax.jit(start, out_shardings=setup.shardings, donate_argnums=1)(dense, fresh)
