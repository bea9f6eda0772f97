"""The specification: gated linear attention in its parallel form (Yang et al. 2024,
eq. 3 unrolled), in fp32, written from the formula and sharing no code with the
implementations. Layout [b, t, h, d] as flash-linear-attention's.

With G_t = Σ_{k<=t} log_g_k (per key dim), the recurrence
``S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` is::

  o_t = scale · Σ_{j<=t} (q_t ⊙ exp(G_t - G_j)) · k_j  v_j  +  scale · (q_t ⊙ exp(G_t)) S_0
  S_T = Σ_{j<=T} diag(exp(G_T - G_j)) k_jᵀ v_j  +  diag(exp(G_T)) S_0

Memory is O(b h t² dk): meant for test sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HI = jax.lax.Precision.HIGHEST


def gla_reference(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    log_g: Float[Array, "b t h dk"],
    scale: float | None = None,
    initial_state: Float[Array, "b h dk dv"] | None = None,
    return_final_state: bool = False,
):
  """o [b, t, h, dv] in q's dtype (and the fp32 final state [b, h, dk, dv] if asked),
  with ``S_0 = initial_state`` (zeros by default) and scale ``dk^-0.5`` by default."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk**-0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  dtype = q.dtype
  q, k, v = f32(q), f32(k), f32(v)
  G = jnp.cumsum(f32(log_g), axis=1)  # [b, t, h, dk]
  causal = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, :, :, None, None]
  gap = jnp.where(causal, G[:, :, None] - G[:, None, :], -jnp.inf)  # [b, t, j, h, dk]
  scores = jnp.einsum("bthd,btjhd,bjhd->btjh", q, jnp.exp(gap), k, precision=_HI)
  o = jnp.einsum("btjh,bjhv->bthv", scores, v, precision=_HI)
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else f32(initial_state)
  o = scale * (o + jnp.einsum("bthd,bhdv->bthv", q * jnp.exp(G), s0, precision=_HI))
  o = o.astype(dtype)
  if not return_final_state:
    return o
  to_end = jnp.exp(G[:, -1:] - G)  # [b, j, h, dk]
  final = jnp.einsum("bjhd,bjhd,bjhv->bhdv", to_end, k, v, precision=_HI)
  return o, final + jnp.exp(G[:, -1])[..., None] * s0
