"""GLA in plain JAX. The chunkwise form (fla's chunk_gla, equations in common.py): one
``lax.scan`` over chunks carrying the fp32 state, each chunk under ``jax.checkpoint`` so
autodiff keeps only chunk-boundary states; usable on any backend, the CPU path. And the
recurrence step by step (fla's ``naive_recurrent_gla``), the "sequential" option."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.gla.common import SUB, chunk_len, pad_axis, round_up


def _intra_scores(q: Float[Array, "b h c dk"], k: Float[Array, "b h c dk"],
                  g: Float[Array, "b h c dk"]) -> Float[Array, "b h c c"]:
  """A_ij = Σ_d q_id k_jd exp(G_id - G_jd) for j <= i, else 0, with every exponent <= 0.

  Off-diagonal sub-blocks use the first row of the query's sub-block as reference;
  diagonal sub-blocks are summed per element. Masked exponents are -inf (not clamped),
  so gradients see no ties."""
  *lead, c, dk = q.shape
  n = c // SUB
  qb, kb, gb = (x.reshape(*lead, n, SUB, dk) for x in (q, k, g))
  ref = gb[..., :1, :]  # [.., n, 1, dk]
  before = (jnp.arange(c)[None, :] < jnp.arange(n)[:, None] * SUB)[..., None]  # [n, c, 1]
  k_ref = k[..., None, :, :] * jnp.exp(jnp.where(before, ref - g[..., None, :, :], -jnp.inf))
  off = jnp.einsum("...nid,...njd->...nij", qb * jnp.exp(gb - ref), k_ref)  # [.., n, SUB, c]
  causal = jnp.tril(jnp.ones((SUB, SUB), bool))[..., None]
  decay = jnp.exp(jnp.where(causal, gb[..., :, None, :] - gb[..., None, :, :], -jnp.inf))
  diag = jnp.einsum("...nid,...njd,...nijd->...nij", qb, kb, decay)  # [.., n, SUB, SUB]
  diag = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(n)).reshape(off.shape)
  return (off + diag).reshape(*lead, c, c)


def _chunk_step(scale: float, state, xs):
  """One chunk: outputs and the state after it (equations in common.py)."""
  q, k, v, log_g = (x.astype(jnp.float32) for x in xs)
  q = q * scale
  g = jnp.cumsum(log_g, axis=-2)
  o = jnp.einsum("bhck,bhkv->bhcv", q * jnp.exp(g), state)
  o = o + jnp.einsum("bhij,bhjv->bhiv", _intra_scores(q, k, g), v)
  last = g[..., -1:, :]
  update = jnp.einsum("bhck,bhcv->bhkv", k * jnp.exp(last - g), v)
  return jnp.exp(last[..., 0, :, None]) * state + update, o


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """[b, t_pad, h, d] -> [n, b, h, c, d]."""
  b, t, h, d = x.shape
  return x.reshape(b, t // c, c, h, d).transpose(1, 0, 3, 2, 4)


def gla_xla(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    log_g: Float[Array, "b t h dk"],
    initial_state: Float[Array, "b h dk dv"],
    scale: float,
    chunk_size: int,
) -> tuple[Float[Array, "b t h dv"], Float[Array, "b h dk dv"]]:
  """Chunked GLA: (o in q's dtype, fp32 final state). Time is padded with k = 0 and
  log_g = 0, which leave the state unchanged."""
  b, t, h, _ = q.shape
  dv = v.shape[-1]
  c = chunk_len(t, chunk_size)
  t_pad = round_up(t, c)
  xs = tuple(_chunks(pad_axis(x, 1, t_pad), c) for x in (q, k, v, log_g))
  step = jax.checkpoint(functools.partial(_chunk_step, scale))
  final, o = jax.lax.scan(step, initial_state.astype(jnp.float32), xs)
  o = o.transpose(1, 0, 3, 2, 4).reshape(b, t_pad, h, dv)[:, :t]
  return o.astype(q.dtype), final


def gla_sequential(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    log_g: Float[Array, "b t h dk"],
    initial_state: Float[Array, "b h dk dv"],
    scale: float,
) -> tuple[Float[Array, "b t h dv"], Float[Array, "b h dk dv"]]:
  """``S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` by a
  ``lax.scan`` over time: (o in q's dtype, fp32 final state)."""
  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731  [t, b, h, d]

  def step(state, xs):
    q_t, k_t, v_t, g_t = xs
    state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t * scale, state)

  final, o = jax.lax.scan(step, initial_state.astype(jnp.float32),
                          tuple(time_major(x) for x in (q, k, v, log_g)))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final
