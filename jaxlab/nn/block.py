"""The residual block every model is made of: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn import attention as _attention  # noqa: F401  (registers "attention")
from jaxlab.nn import linear_attention as _linear_attention  # noqa: F401  (registers "gla")
from jaxlab.nn import mlp as _mlp  # noqa: F401  (registers "mlp")
from jaxlab.nn import moe as _moe  # noqa: F401  (registers "moe")
from jaxlab.nn import ssm as _ssm  # noqa: F401  (registers "mamba", "mamba2", "s4d")
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.norms import make_norm
from jaxlab.nn.registry import FFNS, MIXERS, lookup
from jaxlab.nn.tape import PositionState, TapeMLPUpdate
from jaxlab.sharding import shard

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) (no FFN when the
  config names ``"none"``, as in Zoology's recall models). With TAPE the block also
  carries the position features: the mixer updates them and so does the TAPE map gated
  by the FFN's output. A MoE layer whose experts a pre-gating router picks (Read-ME)
  takes them as ``experts`` [b, t]."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.mixer_norm = make_norm(config)
    self.mixer = lookup(MIXERS, "mixer", config.mixer_of(layer))(config, layer=layer, rngs=rngs)
    has_ffn = config.ffn_of(layer) != "none"
    self.ffn_norm = make_norm(config) if has_ffn else None
    self.ffn = lookup(FFNS, "ffn", config.ffn_of(layer))(config, layer=layer, rngs=rngs) if has_ffn else None
    self.tape = TapeMLPUpdate(config, rngs=rngs) if config.positional == "tape" else None
    self.pregated = config.pregated and config.ffn_of(layer) == "moe"

  def _ffn(self, x: jax.Array, pe: PositionState | None, experts: jax.Array | None):
    if self.ffn is None:
      return x, pe
    h = self.ffn_norm(x)
    out = self.ffn(h, experts) if self.pregated else self.ffn(h)
    return x + out, (None if pe is None else self.tape(pe, out))

  def __call__(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], pe: PositionState | None = None,
               experts: jax.Array | None = None) -> tuple[Float[Array, "b t d"], PositionState | None]:
    h = self.mixer_norm(x)
    if pe is None:
      x = x + self.mixer(h, positions)
    else:
      out, pe = self.mixer(h, positions, pe)
      x = x + out
    x = shard(x, ("batch", "length", "embed"))
    x, pe = self._ffn(x, pe, experts)
    return shard(x, ("batch", "length", "embed")), pe

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> Any:
    return self.mixer.init_cache(batch, max_len, dtype)

  def decode(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], cache: Any,
             pe: PositionState | None = None,
             experts: jax.Array | None = None) -> tuple[Float[Array, "b t d"], Any, PositionState | None]:
    h = self.mixer_norm(x)
    if pe is None:
      out, cache = self.mixer.decode(h, positions, cache)
    else:
      out, cache, pe = self.mixer.decode(h, positions, cache, pe)
    x, pe = self._ffn(x + out, pe, experts)
    return x, cache, pe


def apply_block(block: nnx.Module, x: jax.Array, positions: jax.Array, pe, experts, routes=None):
  """``block``'s forward; ``routes`` (a model-level mixture's gates) go to block mixtures only."""
  return block(x, positions, pe, experts) if routes is None else block(x, positions, routes=routes)
