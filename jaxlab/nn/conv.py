"""Causal depthwise convolution over time, with the last inputs carried for decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.nn.linear import broadcast_leading, logical_param


class CausalConv(nnx.Module):
  """Mamba's short convolution (``nn.Conv1d`` with ``groups = channels`` and
  ``padding = width - 1``, cut to t): ``y_t = b + Σ_k w_k · x_{t - width + 1 + k}``.
  Initialized as PyTorch does, U(±1/sqrt(width))."""

  def __init__(self, channels: int, width: int, channel_name: str, *, rngs: nnx.Rngs):
    bound = width**-0.5
    kernel = jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound)
    bias = jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound)
    self.kernel = logical_param(kernel, ("conv", channel_name))
    self.bias = logical_param(bias, (channel_name,))

  @property
  def width(self) -> int:
    return self.kernel.shape[0]

  def __call__(
      self, x: Float[Array, "b t c"], prefix: Float[Array, "b w1 c"] | None = None
  ) -> tuple[Float[Array, "b t c"], Float[Array, "b w1 c"]]:
    """Convolves x after ``prefix`` (the previous ``width - 1`` inputs; zeros at the
    start of a sequence). Returns y and the new prefix."""
    b, t, c = x.shape
    if prefix is None:
      prefix = jnp.zeros((b, self.width - 1, c), x.dtype)
    padded = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    kernel = self.kernel[...].astype(x.dtype)
    y = broadcast_leading(self.bias[...].astype(x.dtype), 3)
    for k in range(self.width):
      y = y + padded[:, k:k + t] * kernel[k][None, None]
    return y, padded[:, padded.shape[1] - (self.width - 1):]
