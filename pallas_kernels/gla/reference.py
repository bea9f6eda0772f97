"""The specification: the GLA recurrence as a sequential ``lax.scan`` in fp32
(flash-linear-attention's ``naive_recurrent_gla``; same [b, t, h, d] layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def gla_reference(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    log_g: Float[Array, "b t h dk"],
    scale: float | None = None,
    initial_state: Float[Array, "b h dk dv"] | None = None,
    return_final_state: bool = False,
):
  """``S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t`` and ``o_t = scale · q_t S_t`` with
  ``S_0 = initial_state`` (zeros by default) and scale ``dk^-0.5`` by default. Returns o
  in q's dtype, and the fp32 final state when ``return_final_state``."""
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk**-0.5 if scale is None else scale
  state = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state
  f32 = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731  [t, b, h, d]

  def step(state, xs):
    q_t, k_t, v_t, g_t = xs
    state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t * scale, state)

  final, o = jax.lax.scan(step, state.astype(jnp.float32), (f32(q), f32(k), f32(v), f32(log_g)))
  o = jnp.moveaxis(o, 0, 1).astype(q.dtype)
  return (o, final) if return_final_state else o
