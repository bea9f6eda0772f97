"""The specification: the SSD recurrence as a sequential ``lax.scan`` in fp32.

Per batch row and head ``i`` (group ``i // (h // g)`` for B and C)::

  s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_tᵀ        s: [p, n]
  y_t = s_t C_t + D x_t

mamba_ssm's ``ssd_minimal_discrete(X, A, B, C)`` is the same recurrence with
``X = x · dt`` and ``A = A · dt`` and no D; its layout ``[b, l, h, ...]`` matches ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def expand_groups(v: Float[Array, "b t g n"], heads: int) -> Float[Array, "b t h n"]:
  """B or C per head: head i reads group i // (heads // g)."""
  return jnp.repeat(v, heads // v.shape[2], axis=2)


def ssd_reference(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, "h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    D: Float[Array, "h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
    return_final_state: bool = False,
):
  """y [b, t, h, p] in x's dtype (and the fp32 final state [b, h, p, n] if asked)."""
  b, _, h, p = x.shape
  n = B.shape[-1]
  f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
  B_h, C_h = expand_groups(f32(B), h), expand_groups(f32(C), h)
  s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else f32(initial_state)

  def step(s, inputs):
    x_t, dt_t, B_t, C_t = inputs  # [b, h, p], [b, h], [b, h, n], [b, h, n]
    decay = jnp.exp(dt_t * f32(A)[None, :])[:, :, None, None]
    s = decay * s + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    return s, jnp.einsum("bhpn,bhn->bhp", s, C_t)

  time_major = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731
  final, y = jax.lax.scan(step, s0, (time_major(f32(x)), time_major(f32(dt)), time_major(B_h),
                                     time_major(C_h)))
  y = jnp.moveaxis(y, 0, 1)
  if D is not None:
    y = y + f32(D)[None, None, :, None] * f32(x)
  y = y.astype(x.dtype)
  return (y, final) if return_final_state else y
