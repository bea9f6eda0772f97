"""Token embedding; `attend` reuses the table as a tied output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.linear import logical_param


class Embed(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, *, init_std: float, rngs: nnx.Rngs):
    table = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32) * init_std
    self.table = logical_param(table, ("vocab", "embed"))

  def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    return jnp.take(self.table[...], tokens, axis=0)

  def attend(self, x: Float[Array, "b t d"]) -> Float[Array, "b t vocab"]:
    """Logits x · Eᵀ for tied input and output embeddings (Press & Wolf 2017)."""
    return jnp.einsum("bld,vd->blv", x, self.table[...].astype(x.dtype))
