"""Token embedding; `attend` reuses the table as a tied output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.nn.linear import logical_param


class Embed(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, *, init_std: float, rngs: nnx.Rngs):
    table = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32) * init_std
    self.table = logical_param(table, ("vocab", "embed"))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], tokens_BxL, axis=0)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Logits x · Eᵀ for tied input and output embeddings (Press & Wolf 2017)."""
    return jnp.einsum("bld,vd->blv", x_BxLxD, self.table[...].astype(x_BxLxD.dtype))
