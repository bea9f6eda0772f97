"""Positional encodings: RoPE (with linear and NTK scaling), ALiBi slopes, learned
absolute positions. NoPE is the absence of all of them; TAPE lives in tape.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.linear import logical_param

ROPE_SCALINGS = (None, "linear", "ntk")


def rope_angles(
    positions: Int[Array, "b t"], head_dim: int, theta: float,
    scaling: str | None = None, factor: float = 1.0,
) -> Float[Array, "b t half"]:
  """Angles pos · θ_f, θ_f = theta^(-2f/d) (Su et al. 2021, eq. 15). ``linear`` divides
  positions by ``factor`` (Chen et al. 2023, position interpolation); ``ntk`` raises
  the base to theta · factor^(d / (d - 2)) (NTK-aware scaling, bloc97 2023)."""
  if scaling not in ROPE_SCALINGS:
    raise ValueError(f"model.rope_scaling={scaling!r}; use one of {ROPE_SCALINGS}")
  base = theta * factor ** (head_dim / (head_dim - 2)) if scaling == "ntk" else theta
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  pos = positions.astype(jnp.float32)
  if scaling == "linear":
    pos = pos / factor
  return pos[..., None] * inv_freq.reshape((1,) * pos.ndim + (-1,))


def cos_sin(angles: Float[Array, "b t half"]) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
  """cos and sin laid out as Hugging Face's Llama: the half frequencies repeated twice."""
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x: Float[Array, "b t h d"], cos: Float[Array, "b t #h d"], sin: Float[Array, "b t #h d"]):
  """x · cos + rotate_half(x) · sin, feature i paired with i + d/2; computed in fp32.
  cos and sin broadcast over heads (RoPE) or carry one value per head (TAPE)."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


def rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], theta: float,
    scaling: str | None = None, factor: float = 1.0,
) -> Float[Array, "b t h d"]:
  """Rotary position embedding (Su et al. 2021, eq. 34) in the half-split layout."""
  cos, sin = cos_sin(rope_angles(positions, x.shape[-1], theta, scaling, factor))
  return rotate(x, cos[:, :, None, :], sin[:, :, None, :])


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Head slopes of ALiBi (Press et al. 2022): 2^(-8i/n) for n a power of two; otherwise
  those of the largest power of two below n plus every other slope of twice that."""

  def geometric(n):
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float32)


class LearnedPositions(nnx.Module):
  """A learned vector per absolute position, added to the token embeddings (GPT-2).
  Positions past ``max_position - 1`` reuse the last vector."""

  def __init__(self, max_position: int, dim: int, *, init_std: float, rngs: nnx.Rngs):
    table = jax.random.normal(rngs.params(), (max_position, dim), jnp.float32) * init_std
    self.table = logical_param(table, (None, "embed"))

  def __call__(self, positions: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    table = self.table[...]
    return jnp.take(table, jnp.minimum(positions, table.shape[0] - 1), axis=0)
