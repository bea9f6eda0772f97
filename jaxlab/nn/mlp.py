"""Feed-forward layers: SwiGLU (Shazeer 2020; Llama) and GELU (GPT-2)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear
from jaxlab.nn.registry import register_ffn
from jaxlab.sharding import shard


@register_ffn("mlp")
class MLP(nnx.Module):
  """swiglu: down(silu(gate(x)) · up(x));  gelu: down(gelu(up(x)))."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, f = config.d_model, config.mlp_dim
    dense = dict(use_bias=config.mlp_bias, init_std=config.init_std, rngs=rngs)
    self.activation = config.mlp_activation
    self.gate = Linear((d,), (f,), ("embed",), ("mlp",), **dense) if self.activation == "swiglu" else None
    self.up = Linear((d,), (f,), ("embed",), ("mlp",), **dense)
    self.down = Linear((f,), (d,), ("mlp",), ("embed",), **dense)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    h_BxLxF = self.up(x_BxLxD)
    if self.gate is not None:
      h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * h_BxLxF
    else:
      h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
    h_BxLxF = shard(h_BxLxF, ("batch", "length", "mlp"))
    return self.down(h_BxLxF)
