"""Training LiGO's operator (the official ``run_grow_distributed.py``): the large model's
forward uses the operator's weights, only the operator's parameters are free, the small
model is frozen; AdamW (ε 1e-6, weight decay 0.1 on every coefficient), gradient
clipping at 1.0 and a linear schedule with warmup, on this run's training loss.

The released command trains for 100 steps but inherits ``warmup_steps=10000`` from its
config, so its learning rate never passes 2e-4 · 100/10000 = 2e-6 and the operator
barely leaves its initialization. ``init.ligo_warmup`` makes that a choice: jaxlab's
default warms up over 10 steps; set it to 10000 to reproduce the released command.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlab.growth import LiGO
from jaxlab.train.step import COMPUTE_DTYPES, Batch, forward, weighted_cross_entropy

log = logging.getLogger(__name__)


def operator_schedule(init: Any) -> optax.Schedule:
  """Linear warmup to ``init.ligo_lr`` over ``init.ligo_warmup`` steps, then linear decay
  to zero at ``init.ligo_steps`` (Hugging Face's linear schedule, as the official run)."""
  warmup = max(init.ligo_warmup, 1)
  return optax.join_schedules([optax.linear_schedule(0.0, init.ligo_lr, warmup),
                               optax.linear_schedule(init.ligo_lr, 0.0, max(init.ligo_steps - warmup, 1))],
                              [warmup])


def operator_optimizer(init: Any) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(operator_schedule(init), eps=1e-6, weight_decay=init.ligo_weight_decay))


def fit_ligo(ligo: LiGO, small: nnx.State, model_state: nnx.State, setup,
             batches: Iterator[Batch]) -> tuple[dict, list[float]]:
  """LiGO's parameters after ``init.ligo_steps`` steps on ``batches`` (global batches of
  this run; ``model_state`` the large model's fresh one), and each step's loss."""
  config, init = setup.config, setup.config.init
  peak = init.ligo_lr * min(1.0, init.ligo_steps / max(init.ligo_warmup, 1))
  if init.ligo_warmup >= init.ligo_steps:
    log.warning("init.ligo_warmup=%d >= init.ligo_steps=%d: the operator's learning rate peaks at %.2g, so it "
                "barely trains (as the released LiGO command does)", init.ligo_warmup, init.ligo_steps, peak)
  tx = operator_optimizer(init)
  dtype = COMPUTE_DTYPES[config.train.compute_dtype]
  graphdef, params_sharding = setup.graphdef, setup.shardings.params

  @jax.jit
  def step(theta, opt_state, small, model_state, batch, rng):
    def objective(theta):
      params = jax.lax.with_sharding_constraint(ligo.apply(theta, small), params_sharding)
      logits, losses, _ = forward(graphdef, params, model_state, batch, dtype, rng)
      ce, _, weight = weighted_cross_entropy(logits, batch)
      reported = sum(jax.tree.leaves(losses), jnp.zeros((), jnp.float32))
      return ce / jnp.maximum(weight, 1.0) + reported / batch["inputs"].shape[0], ce / jnp.maximum(weight, 1.0)

    (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(theta)
    updates, opt_state = tx.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss

  theta = ligo.init(init.ligo_depth_init, init.ligo_width_init)
  opt_state, rng, losses = tx.init(theta), jax.random.key(config.seed), []
  for i in range(init.ligo_steps):
    theta, opt_state, loss = step(theta, opt_state, small, model_state, next(batches), jax.random.fold_in(rng, i))
    losses.append(float(loss))
  log.info("LiGO operator: loss %.4f -> %.4f over %d steps", losses[0] if losses else float("nan"),
           losses[-1] if losses else float("nan"), init.ligo_steps)
  return theta, losses
