"""Jitted train and eval steps on functional NNX state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.nn.reports import apply_state_updates, capture_reports, flat_reports, metric_summary
from jaxlab.sharding import shard
from jaxlab.train.state import TrainState

Batch = dict[str, jax.Array]
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floating(tree: Any, dtype) -> Any:
  """Casts floating leaves to ``dtype`` (fp32 master weights, low-precision compute)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def weighted_cross_entropy(logits: Float[Array, "b t vocab"], batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums over tokens of weight · CE and weight · [argmax == target], and of weights."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"]
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def forward(graphdef: nnx.GraphDef, params: Any, model_state: Any, batch: Batch, dtype, rng):
  """Logits and the model's captured (losses, metrics) (`jaxlab.nn.reports`)."""
  model = nnx.merge(graphdef, cast_floating(params, dtype), model_state)
  inputs = shard(batch["inputs"], ("batch", "length"))
  return capture_reports(model, inputs, rng=rng)


def _sum_leaves(tree: Any) -> jax.Array:
  return sum(jax.tree.leaves(tree), jnp.zeros((), jnp.float32))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    compute_dtype: str,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over the global batch, split into ``grad_accum`` micro-batches.

  The objective is the weighted token mean of the cross-entropy over the whole batch
  plus the loss terms the model reports (`jaxlab.nn.reports`: sums over sequences,
  divided by the batch's sequence count), so accumulating micro-batches gives the same
  update as one large batch. After the update, modules with training-updated state
  (``update_state``) see the batch's metrics and ``model_state`` is written back.
  Metrics: ``loss`` (the cross-entropy), each reported loss term and metric, norms and
  the learning rate. A step whose loss, gradient norm or update norm is not finite
  changes nothing: it returns ``state`` as it was, with ``metrics["finite"]`` false.
  """
  dtype = COMPUTE_DTYPES[compute_dtype]
  num_sequences = batch["inputs"].shape[0]
  total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
  rng, step_rng = jax.random.split(state.rng)

  def objective(params, micro, micro_rng):
    logits, losses, metrics = forward(graphdef, params, state.model_state, micro, dtype, micro_rng)
    ce, _, _ = weighted_cross_entropy(logits, micro)
    value = ce / total_weight + _sum_leaves(losses) / num_sequences
    return value, (ce, losses, metrics)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  # Micro-batch m takes rows m, m + A, m + 2A, ...: each device keeps its own rows.
  micro_batches = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
      batch,
  )
  micro_rngs = jax.random.split(step_rng, grad_accum)

  def accumulate(carry, micro_and_rng):
    (_, reports), grads = grad_fn(state.params, *micro_and_rng)
    return jax.tree.map(jnp.add, carry, (reports, grads)), None

  first = jax.tree.map(lambda x: x[0], (micro_batches, micro_rngs))
  shapes = jax.eval_shape(lambda: grad_fn(state.params, *first))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][1], shapes[1]))
  ((ce, losses, metrics), grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_rngs))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  model = nnx.merge(graphdef, params, state.model_state)
  apply_state_updates(model, metrics, num_sequences)
  model_state = nnx.split(model, nnx.Param, ...)[2]
  per_sequence = lambda tree: {k: v / num_sequences for k, v in flat_reports(tree).items()}  # noqa: E731
  metrics = {
      "loss": ce / total_weight,
      **per_sequence(losses),
      **metric_summary(per_sequence(metrics)),
      "grad_norm": optax.tree.norm(grads),
      "update_norm": optax.tree.norm(updates),
      "learning_rate": schedule(state.step),
  }
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(
      metrics["update_norm"])
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state, rng=rng)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return new_state, {**metrics, "finite": finite}


def forward_with_sinks(model: nnx.Module, inputs: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and each attention layer's mean attention weight on the first token
  (the attention-sink measure), captured from a forward pass."""
  model.set_attributes(record_sink=True, raise_if_not_found=False)
  logits, sown = nnx.capture(model, nnx.Intermediate)(inputs)
  model.set_attributes(record_sink=False, raise_if_not_found=False)
  sinks = {
      f"attention_sink/layer_{path[1].key}": leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]
  }
  return logits, sinks


def eval_step(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, compute_dtype: str
) -> dict[str, jax.Array]:
  """Sums of weighted loss, correct predictions and weights over one batch, and each
  attention layer's mean attention weight on the first token."""
  model = nnx.merge(graphdef, cast_floating(state.params, COMPUTE_DTYPES[compute_dtype]),
                    state.model_state)
  logits, sinks = forward_with_sinks(model, shard(batch["inputs"], ("batch", "length")))
  total, correct, weight = weighted_cross_entropy(logits, batch)
  return {"loss_sum": total, "correct_sum": correct, "weight_sum": weight, **sinks}
