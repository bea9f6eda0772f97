"""Positional encodings applied to queries and keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], theta: float
) -> Float[Array, "b t h d"]:
  """Rotary position embedding (Su et al. 2021, eq. 34) in the half-split layout of
  Hugging Face's Llama: feature i pairs with feature i + d/2. Computed in fp32."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [b, t, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
