"""RMSNorm and LayerNorm, computed in fp32 and returned in the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import broadcast_leading, logical_param


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · scale  (Zhang & Sennrich 2019; Llama's LlamaRMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.eps = eps
    self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * broadcast_leading(self.scale[...].astype(jnp.float32), y.ndim)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """y = (x − mean) / sqrt(var + eps) · scale + bias  (Ba et al. 2016)."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.eps = eps
    self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("embed",))
    self.bias = logical_param(jnp.zeros((dim,), jnp.float32), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * broadcast_leading(self.scale[...].astype(jnp.float32), y.ndim)
    y = y + broadcast_leading(self.bias[...].astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)


def make_norm(config: ModelConfig) -> RMSNorm | LayerNorm:
  cls = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[config.norm]
  return cls(config.d_model, eps=config.norm_eps)
