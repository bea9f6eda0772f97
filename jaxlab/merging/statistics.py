"""What the data-aware merges need from each model: its diagonal Fisher (Fisher merging)
and the Gram matrices of its linear layers' inputs (RegMean), estimated on batches of
that model's own data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.reports import capture_input_grams

Batch = dict[str, Int[Array, "b l"] | Float[Array, "b l"]]


def diagonal_fisher(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, batches: Iterable[Batch],
                    *, seed: int = 0, empirical: bool = False) -> nnx.State:
  """``F = E_x E_{y ~ p_θ(·|x)} [(∇_θ log p_θ(y|x))²]`` (Matena & Raffel 2022, eq. 2), one
  example being one sequence of a batch's ``inputs`` (its tokens' log-likelihoods summed,
  weighted by ``weights``): per-sequence gradients, squared, averaged over the sequences.
  The labels ``y`` are sampled from the model (one per token, from ``seed``), the
  paper's Fisher; ``empirical=True`` uses the data's ``targets`` instead (the empirical
  Fisher). Returns a tree shaped like ``params``."""

  def log_likelihood(params, inputs, targets, weights, key):
    model = nnx.merge(graphdef, params, model_state)
    logits = model(inputs[None])[0].astype(jnp.float32)
    labels = targets if empirical else jax.random.categorical(key, jax.lax.stop_gradient(logits))
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return jnp.sum(weights * picked)

  @jax.jit
  def squared_gradients(params, batch, key):
    keys = jax.random.split(key, batch["inputs"].shape[0])
    grads = jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0, 0, 0))(
        params, batch["inputs"], batch["targets"], batch["weights"], keys)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), grads)

  total, count = None, 0
  for i, batch in enumerate(batches):
    squares = squared_gradients(params, batch, jax.random.fold_in(jax.random.key(seed), i))
    total = squares if total is None else jax.tree.map(jnp.add, total, squares)
    count += batch["inputs"].shape[0]
  if total is None:
    raise ValueError("diagonal_fisher got no batches.")
  return jax.tree.map(lambda f: f / count, total)


def input_grams(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                batches: Iterable[Batch]) -> dict[str, Float[Array, "i i"]]:
  """``{kernel name: X^T X / tokens}`` for every linear layer (`jaxlab.nn.linear.Linear`),
  ``X`` its inputs on the batches' ``inputs`` flattened to [tokens, fan-in] (Jin et al.
  2023, eq. 2's ``G``; normalized per token so that models measured on different amounts
  of data weigh alike)."""

  @jax.jit
  def grams(params, inputs):
    _, captured = capture_input_grams(nnx.merge(graphdef, params, model_state), inputs)
    return {"/".join(map(str, path[:-1])) + "/kernel": leaf.get_value() for path, leaf in nnx.to_flat_state(captured)}

  total: dict[str, Any] | None = None
  tokens = 0
  for batch in batches:
    out = grams(params, batch["inputs"])
    total = out if total is None else jax.tree.map(jnp.add, total, out)
    tokens += batch["inputs"].size
  if total is None:
    raise ValueError("input_grams got no batches.")
  return {name: gram / tokens for name, gram in total.items()}
