"""Abacus embeddings (McLeish et al. 2024, "Transformers Can Do Arithmetic with the
Right Embeddings", §3): a learned vector for each digit's index within its number,
added to the token embeddings, whatever the attention's positional encoding.

Index 1 is a number's first written digit (its least significant one in reversed
arithmetic), 2 the next, and so on; every other token has index 0. In training every
digit index is shifted by one offset k ~ U{0, ..., abacus_max_offset} per step, as the
official code draws one k per forward pass, so that indices longer than the training
numbers are trained too and the model generalizes to longer numbers at test (k = 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import logical_param
from jaxlab.nn.reports import EMBEDDING_STREAM, training_rng


def digit_indices(digits: Int[Array, "b t"], carry: Int[Array, "b"] | None = None) -> Int[Array, "b t"]:
  """Each position's index within its run of consecutive digits (1-based), 0 off digits.

  ``digits`` is 1 where the token is a digit; ``carry`` is the length of the run of digits
  that ends just before the first position (decoding continues a number across calls)."""
  b, t = digits.shape
  carry = jnp.zeros((b,), jnp.int32) if carry is None else carry
  digits = digits.astype(bool)
  previous = jnp.concatenate([(carry > 0)[:, None], digits[:, :-1]], axis=1)
  time = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = jnp.where(digits & ~previous, time, jnp.iinfo(jnp.int32).min)
  run_start = jnp.maximum(jax.lax.cummax(starts, axis=1), -carry[:, None])  # a run that began before
  return jnp.where(digits, time - run_start + 1, 0)


class AbacusPositions(nnx.Module):
  """``abacus(tokens) -> [b, t, d]`` and the digit run at the last position (for decoding)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    size = config.abacus_max_offset + config.abacus_max_digits + 1
    table = jax.random.normal(rngs.params(), (size, config.d_model), jnp.float32) * config.init_std
    self.table = logical_param(table, (None, "embed"))
    self.digit_tokens, self.max_offset = config.abacus_digit_tokens, config.abacus_max_offset

  def __call__(self, tokens: Int[Array, "b t"],
               carry: Int[Array, "b"] | None = None) -> tuple[Float[Array, "b t d"], Int[Array, "b"]]:
    first, last = self.digit_tokens
    index = digit_indices((tokens >= first) & (tokens <= last), carry)
    run = index[:, -1]
    key = training_rng(EMBEDDING_STREAM)
    if key is not None and self.max_offset > 0:
      index = jnp.where(index > 0, index + jax.random.randint(key, (), 0, self.max_offset + 1), 0)
    table = self.table[...]
    return jnp.take(table, jnp.minimum(index, table.shape[0] - 1), axis=0), run
