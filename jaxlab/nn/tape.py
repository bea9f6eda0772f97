"""TAPE: contextualized equivariant positional encoding (Zhu et al., ICML 2025; the
official code is VITA-Group/TAPE, ``models/llama/adape.py``, there called "adape").

Every token carries per-head position features E = (C, S), each [b, t, h, d_head],
initialized as RoPE's cos and sin of its position. Attention rotates queries and keys
with the token's current (C, S) instead of fixed angles, and updates E with the same
attention weights (Attention._tape_update: E <- E + g_h · αE, g zero-initialized). The
MLP updates E with a map over heads gated by the MLP's output m:

    E <- E + W_down (silu(W_x m) ⊙ W_up E),     W_up zero-initialized.

Every learned map acts on the head axis alone, identically on C and S and on every
frequency, so it commutes with any rotation of the (C, S) pairs: logits are invariant
to a global position offset for any parameters, and at initialization TAPE is RoPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear, logical_param
from jaxlab.nn.positional import cos_sin, rope_angles

PositionState = tuple[jax.Array, jax.Array]


def initial_position_state(positions: Int[Array, "b t"], config: ModelConfig) -> PositionState:
  """RoPE's cos and sin of each position, copied to every head: [b, t, h, d_head] each."""
  cos, sin = cos_sin(rope_angles(positions, config.dim_per_head, config.rope_theta,
                                 config.rope_scaling, config.rope_scaling_factor))
  shape = (*positions.shape, config.num_heads, config.dim_per_head)
  return (jnp.broadcast_to(cos[:, :, None, :], shape), jnp.broadcast_to(sin[:, :, None, :], shape))


class TapeMLPUpdate(nnx.Module):
  """The MLP path of TAPE: E <- E + W_down (silu(W_x m) ⊙ W_up E), over heads."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    h, width = config.num_heads, config.tape_width
    self.up = logical_param(jnp.zeros((h, width), jnp.float32), ("heads", None))
    self.x_proj = Linear((config.d_model,), (width,), ("embed",), (None,), init_std=config.init_std,
                         rngs=rngs)
    down = jax.random.normal(rngs.params(), (width, h), jnp.float32) * config.init_std
    self.down = logical_param(down, (None, "heads"))

  def __call__(self, pe: PositionState, mlp_out: Float[Array, "b t d"]) -> PositionState:
    gate = jax.nn.silu(self.x_proj(mlp_out).astype(jnp.float32))[..., None]  # [b, t, P, 1]
    up, down = self.up[...].astype(jnp.float32), self.down[...].astype(jnp.float32)

    def update(e):
      mixed = jnp.einsum("bthd,hp->btpd", e, up)
      return e + jnp.einsum("btpd,ph->bthd", gate * mixed, down)

    return update(pe[0]), update(pe[1])
