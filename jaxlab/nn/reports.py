"""What a module reports beyond its output: loss terms and metrics, sown as NNX
intermediates while a step captures them (`capture_reports`), and nothing otherwise.

Every reported value is a **sum over the sequences of the batch** of a per-sequence
value. The train step adds up the sums of its micro-batches and divides by the number
of sequences in the global batch, so a loss term is exact under gradient accumulation
and a metric is its mean per sequence. A 1-D metric (one entry per expert, say) is
logged per entry and as its max / mean.

A module whose non-parameter state training updates defines
``update_state(metrics: dict[str, jax.Array])``; the train step calls it once per step,
after the optimizer update, with the module's metrics for the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class Loss(nnx.Intermediate):
  """A term of the training loss (already weighted), summed over the batch's sequences."""


class Metric(nnx.Intermediate):
  """A logged value, summed over the batch's sequences."""


class InputGram(nnx.Intermediate):
  """``Σ x xᵀ`` over the tokens a linear layer read, its inputs flattened (RegMean's statistic)."""


_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxlab_reports", default=None)


@contextlib.contextmanager
def _reporting(rng: jax.Array | None) -> Iterator[None]:
  token = _ACTIVE.set({"rng": rng})
  try:
    yield
  finally:
    _ACTIVE.reset(token)


EMBEDDING_STREAM = 2**32 - 1  # `training_rng` index of the embeddings' noise (Abacus offsets); layers use theirs


def training_rng(stream: int) -> jax.Array | None:
  """A key for training-time noise, None outside training: ``stream`` is a layer's index
  for its router jitter, `EMBEDDING_STREAM` for the Abacus offset."""
  active = _ACTIVE.get()
  if active is None or active["rng"] is None:
    return None
  return jax.random.fold_in(active["rng"], stream)


def report(module: nnx.Module, kind: type[nnx.Intermediate], name: str, value: jax.Array) -> None:
  """Sows ``value`` (a sum over sequences) when a step captures reports; else nothing."""
  if _ACTIVE.get() is not None:
    module.sow(kind, name, value, init_fn=lambda: 0.0, reduce_fn=jnp.add)


_INPUT_GRAMS: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxlab_input_grams", default=False)


def report_input_gram(module: nnx.Module, x: jax.Array, num_in: int) -> None:
  """Sows the Gram of ``x``'s trailing ``num_in`` axes (flattened; the rest are tokens)
  while `capture_input_grams` runs; else nothing."""
  if _INPUT_GRAMS.get():
    x = x.reshape(-1, math.prod(x.shape[x.ndim - num_in:])).astype(jnp.float32)
    module.sow(InputGram, "input_gram", x.T @ x, init_fn=lambda: 0.0, reduce_fn=jnp.add)


def capture_input_grams(model: nnx.Module, *args) -> tuple[Any, nnx.State]:
  """``model(*args)`` and the input Gram of every `jaxlab.nn.linear.Linear` it called."""
  token = _INPUT_GRAMS.set(True)
  try:
    return nnx.capture(model, InputGram)(*args)
  finally:
    _INPUT_GRAMS.reset(token)


def capture_reports(model: nnx.Module, *args, rng: jax.Array | None = None) -> tuple[Any, nnx.State, nnx.State]:
  """``model(*args)`` with reporting on: (output, losses, metrics). ``rng`` turns on
  training-time noise."""
  with _reporting(rng):
    return nnx.capture(model, Loss, Metric)(*args)


def flat_reports(reports: nnx.State) -> dict[str, jax.Array]:
  """A captured State as ``{"ffn/aux_loss/layer_1": value}``: the module path under a
  block with the block's index moved to the end, so each quantity groups across layers."""
  flat = {}
  for path, leaf in nnx.to_flat_state(reports):
    keys = [str(k) for k in path]
    if len(keys) > 2 and keys[0] == "blocks":
      name = "/".join(keys[2:]) + f"/layer_{keys[1]}"
    else:
      name = "/".join(keys)
    flat[name] = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
  return flat


def metric_summary(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Scalar metrics as they are; a 1-D metric per entry and as max / mean."""
  out = {}
  for name, value in metrics.items():
    if value.ndim == 0:
      out[name] = value
      continue
    for i in range(value.shape[0]):
      out[f"{name}/{i}"] = value[i]
    out[f"{name}/max_over_mean"] = jnp.max(value) / jnp.maximum(jnp.mean(value), 1e-9)
  return out


def apply_state_updates(model: nnx.Module, metrics: nnx.State, num_sequences: int) -> None:
  """Calls ``update_state`` of every module that has it with its batch-mean metrics."""
  by_module: dict[tuple, dict[str, jax.Array]] = {}
  for path, leaf in nnx.to_flat_state(metrics):
    by_module.setdefault(tuple(path[:-1]), {})[str(path[-1])] = leaf[...] / num_sequences
  for path, module in nnx.iter_modules(model):
    if hasattr(module, "update_state"):
      module.update_state(by_module.get(tuple(path), {}))
