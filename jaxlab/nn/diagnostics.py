"""The recency and over-smoothing diagnostics of Wang et al. 2025 ("Understanding and
Mitigating Bottlenecks of State Space Models through the Lens of Recency and
Over-smoothing"), for any `Transformer` whatever its mixers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.transformer import Transformer


def influence(model: Transformer, tokens: Int[Array, "b t"], target: int) -> Float[Array, "b t"]:
  """|∂y_target / ∂x_i|: the Frobenius norm of the Jacobian of the last block's output at
  position ``target`` with respect to the input embedding at every position i (zero
  for i > target in a causal model). The recency measure of the paper's §3."""
  graphdef, state = nnx.split(model)
  x, positions, pe = model.embeddings(tokens)

  def output_at_target(x_batch, positions_batch, pe_batch):  # a batch of one: [1, t, d], [1, t]
    net = nnx.merge(graphdef, state)
    return net.hidden_states(x_batch, positions_batch, pe_batch)[-1][0, target].astype(jnp.float32)

  def one_example(x_one, positions_one, pe_one):  # [t, d], [t]
    pe_batch = None if pe_one is None else jax.tree.map(lambda a: a[None], pe_one)
    jac = jax.jacrev(output_at_target)(x_one[None].astype(jnp.float32), positions_one[None], pe_batch)
    return jnp.sqrt(jnp.sum(jnp.square(jac[:, 0]), axis=(0, 2)))  # [d, t, d] -> [t]

  return jax.vmap(one_example)(x, positions, pe)


def influence_by_distance(
    model: Transformer, tokens: Int[Array, "b t"], targets: tuple[int, ...]
) -> Float[Array, "distance"]:
  """Mean influence of a token on the output ``distance = target - i`` positions later,
  averaged over examples and over the given targets (distances up to min(targets))."""
  horizon = min(targets) + 1
  curves = []
  for target in targets:
    scores = influence(model, tokens, target)  # [b, t]
    curves.append(jnp.mean(scores[:, target - jnp.arange(horizon)], axis=0))
  return jnp.mean(jnp.stack(curves), axis=0)


def mean_pairwise_cosine(h: Float[Array, "b t d"]) -> jax.Array:
  """Mean cosine similarity over all pairs of distinct positions, averaged over the batch."""
  unit = h.astype(jnp.float32)
  unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
  gram = jnp.einsum("bid,bjd->bij", unit, unit)
  t = h.shape[1]
  return jnp.mean((jnp.sum(gram, axis=(1, 2)) - jnp.trace(gram, axis1=1, axis2=2)) / (t * (t - 1)))


def oversmoothing(model: Transformer, tokens: Int[Array, "b t"]) -> Float[Array, "layers1"]:
  """Mean pairwise cosine similarity of the token representations before the first
  block and after each block: the over-smoothing measure of the paper's §4 (it rises
  towards 1 as representations become indistinguishable)."""
  states = model.hidden_states(*model.embeddings(tokens))
  return jnp.stack([mean_pairwise_cosine(h) for h in states])
