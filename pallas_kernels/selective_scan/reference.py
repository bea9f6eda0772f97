"""The specification: mamba_ssm's ``selective_scan_ref`` in fp32, batch-major, written
from its formulas and sharing no code with the implementations (``common.py``).

mamba_ssm is channel-first (u ``[B D L]``, B ``[B N L]`` or ``[B G N L]``); here time
is second: u ``[b, t, d]``, B ``[b, t, n]`` or ``[b, t, g, n]``. Per channel c and
state s (Gu & Dao 2023, eqs. 2a-2b and 4 with ZOH for A and Euler for B)::

  Δ     = softplus(delta + delta_bias)              (each part when asked)
  x_t   = exp(Δ_t A) ⊙ x_{t-1} + Δ_t u_t B_t
  y_t   = (C_t · x_t + D u_t) · silu(z_t)           (D, z when given)

Channel c reads group ``c // (d // g)`` of a grouped B or C. States are ``[b, d, n]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HI = jax.lax.Precision.HIGHEST


def _channels_by_group(v: Float[Array, "b t n"] | Float[Array, "b t g n"], d: int) -> Float[Array, "b t g dg n"]:
  """B or C as [b, t, groups, 1, n] against channels laid out [groups, d // groups]."""
  v = v.astype(jnp.float32)
  return (v[:, :, None] if v.ndim == 3 else v)[:, :, :, None, :]


def selective_scan_reference(
    u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
    B: Float[Array, "b t n"] | Float[Array, "b t g n"], C: Float[Array, "b t n"] | Float[Array, "b t g n"],
    D: Float[Array, "d"] | None = None, z: Float[Array, "b t d"] | None = None,
    delta_bias: Float[Array, "d"] | None = None, delta_softplus: bool = False,
    initial_state: Float[Array, "b d n"] | None = None, return_final_state: bool = False,
):
  """mamba_ssm's ``selective_scan_ref`` (see the module docstring), batch-major, with an
  optional fp32 initial state [b, d, n]. Returns y in u's dtype, and the fp32 final
  state [b, d, n] when ``return_final_state``."""
  b, t, d = u.shape
  n = A.shape[1]
  groups = 1 if B.ndim == 3 else B.shape[2]
  step = delta.astype(jnp.float32)
  if delta_bias is not None:
    step = step + delta_bias.astype(jnp.float32)[None, None]
  if delta_softplus:
    step = jnp.log1p(jnp.exp(-jnp.abs(step))) + jnp.maximum(step, 0.0)  # softplus
  u32 = u.astype(jnp.float32)
  by_group = lambda v: v.reshape(b, t, groups, d // groups)  # noqa: E731
  # Discretized, for every step at once: Ā_t = exp(Δ_t A), B̄_t u_t = Δ_t u_t B_t.
  decay = jnp.exp(step[..., None] * A.astype(jnp.float32)[None, None])  # [b, t, d, n]
  drive = (by_group(step * u32)[..., None] * _channels_by_group(B, d)).reshape(b, t, d, n)
  x0 = jnp.zeros((b, d, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

  def advance(x, decay_and_drive):
    a_t, bu_t = decay_and_drive
    x = a_t * x + bu_t
    return x, x

  final, states = jax.lax.scan(advance, x0, (decay.swapaxes(0, 1), drive.swapaxes(0, 1)))
  states = states.swapaxes(0, 1).reshape(b, t, groups, d // groups, n)  # x_t for every t
  y = jnp.einsum("btgcn,btgon->btgc", states, _channels_by_group(C, d), precision=_HI).reshape(b, t, d)
  if D is not None:
    y = y + D.astype(jnp.float32)[None, None] * u32
  if z is not None:
    z32 = z.astype(jnp.float32)
    y = y * z32 / (1.0 + jnp.exp(-z32))  # silu
  y = y.astype(u.dtype)
  return (y, final) if return_final_state else y
