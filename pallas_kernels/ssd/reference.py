"""The specification: SSD as one semiseparable matrix over the whole sequence (Dao & Gu
2024, §3: y = M x with M = L ∘ C Bᵀ), in fp32, written from the formula and sharing no
code with the implementations.

Per batch row and head i (group i // (h // g) for B and C), with a_k = dt_k A_i::

  y_t = Σ_{j<=t} exp(Σ_{j<k<=t} a_k) (C_t · B_j) dt_j x_j + exp(Σ_{k<=t} a_k) s_0 C_t + D x_t
  s_T = Σ_{j<=T} exp(Σ_{j<k<=T} a_k) dt_j x_j B_jᵀ + exp(Σ_{k<=T} a_k) s_0         s: [p, n]

which unrolls the recurrence s_t = exp(a_t) s_{t-1} + dt_t x_t B_tᵀ, y_t = s_t C_t + D x_t.
mamba_ssm's ``ssd_minimal_discrete(X, A, B, C)`` is the same with ``X = x · dt`` and
``A = A · dt`` and no D; its layout ``[b, l, h, ...]`` matches ours. Memory is
O(b h t²): meant for test sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HI = jax.lax.Precision.HIGHEST


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
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  heads = h // g
  f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
  xg = f32(x).reshape(b, t, g, heads, p)
  dtg = f32(dt).reshape(b, t, g, heads)
  a = dtg * f32(A).reshape(g, heads)[None, None]  # [b, t, g, heads]
  total = jnp.cumsum(a, axis=1)  # Σ_{k<=t} a_k
  later = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [t (out), j (in)]
  gap = total[:, :, None] - total[:, None, :]  # [b, t, j, g, heads]: Σ_{j<k<=t} a_k
  gap = jnp.where(later[None, :, :, None, None], gap, -jnp.inf)
  mix = jnp.exp(gap) * jnp.einsum("btgn,bjgn->btjg", f32(C), f32(B), precision=_HI)[..., None]
  y = jnp.einsum("btjgh,bjgh,bjghp->btghp", mix, dtg, xg, precision=_HI)
  s0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
        else f32(initial_state)).reshape(b, g, heads, p, n)
  y = y + jnp.exp(total)[..., None] * jnp.einsum("bghpn,btgn->btghp", s0, f32(C), precision=_HI)
  if D is not None:
    y = y + f32(D).reshape(g, heads)[None, None, :, :, None] * xg
  y = y.reshape(b, t, h, p).astype(x.dtype)
  if not return_final_state:
    return y
  to_end = jnp.exp(total[:, -1:] - total)  # [b, j, g, heads]: Σ_{j<k<=T} a_k
  final = jnp.einsum("bjgh,bjgh,bjghp,bjgn->bghpn", to_end, dtg, xg, f32(B), precision=_HI)
  final = final + jnp.exp(total[:, -1])[..., None, None] * s0
  return y, final.reshape(b, h, p, n)
