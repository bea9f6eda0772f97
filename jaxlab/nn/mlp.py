"""Feed-forward layers: SwiGLU (Shazeer 2020; Llama) and GELU (GPT-2)."""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear
from jaxlab.nn.registry import register_ffn
from jaxlab.sharding import shard


@register_ffn("mlp")
class MLP(nnx.Module):
  """swiglu: down(silu(gate(x)) · up(x));  gelu: down(gelu(up(x))).

  The down projection's input h is exposed for analyses (Read-ME's carving, Taylor
  importance; `jaxlab.growth.readme`): with ``record_down_input`` set, under
  ``nnx.capture``, it is sown as the intermediate ``down_input`` and the perturbation
  ``down_input`` (zeros) is added to it, whose gradient is ∂loss/∂h."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, f = config.d_model, config.mlp_dim
    dense = dict(use_bias=config.mlp_bias, init_std=config.init_std, rngs=rngs)
    self.activation = config.mlp_activation
    self.gate = Linear((d,), (f,), ("embed",), ("mlp",), **dense) if self.activation == "swiglu" else None
    self.up = Linear((d,), (f,), ("embed",), ("mlp",), **dense)
    self.down = Linear((f,), (d,), ("mlp",), ("embed",), **dense)
    self.record_down_input = False

  def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    h = self.up(x)  # [b, t, f]
    if self.gate is not None:
      h = jax.nn.silu(self.gate(x)) * h
    else:
      h = jax.nn.gelu(h, approximate=True)
    h = shard(h, ("batch", "length", "mlp"))
    if self.record_down_input:  # inside nnx.capture only
      h = self.perturb("down_input", h)
      self.sow(nnx.Intermediate, "down_input", h)
    return self.down(h)
