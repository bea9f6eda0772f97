"""Scans in plain JAX: a full-length associative scan, and the chunked scan (the default
off TPU and GPU): ``lax.scan`` over chunks of time with the recurrence unrolled inside
each chunk, each chunk under ``jax.checkpoint`` so that the backward pass keeps only
chunk-boundary states (O(t/chunk · b·d·n)) and recomputes one chunk at a time.

Unrolling a short chunk lets XLA fuse its steps and pays the loop's per-iteration cost
once per chunk; an associative scan inside the chunk does log2(chunk) times the work,
which on a CPU costs more than it saves (experiments/benchmarks/scan.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.selective_scan.common import per_channel

DEFAULT_CHUNK = 16


def _combine(earlier, later):
  """(a1, b1) then (a2, b2): x -> a2 (a1 x + b1) + b2."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _scan_block(u, delta, A, B, C, x0):
  """Associative scan over axis 1 of one block with x0 folded into its first step:
  returns y [b, l, d] and the last state [b, d, n]."""
  decay = jnp.exp(delta[..., None] * A[None, None])  # [b, l, d, n]
  drive = (delta * u)[..., None] * B
  drive = drive.at[:, 0].add(decay[:, 0] * x0)
  _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
  return jnp.sum(states * C, axis=-1), states[:, -1]


def _unrolled_block(u, delta, A, B, C, x0):
  """The recurrence step by step over axis 1 of one block (a Python loop: unrolled)."""
  x, ys = x0, []
  for i in range(u.shape[1]):
    x = jnp.exp(delta[:, i, :, None] * A[None]) * x + (delta[:, i] * u[:, i])[..., None] * B[:, i]
    ys.append(jnp.sum(x * C[:, i], axis=-1))
  return jnp.stack(ys, axis=1), x


def scan_associative(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
                     B: Float[Array, "b t n"] | Float[Array, "b t g n"],
                     C: Float[Array, "b t n"] | Float[Array, "b t g n"], x0: Float[Array, "b d n"]):
  """The bare scan (y_t = C_t · x_t) as one associative scan over all of time: memory
  O(b·t·d·n). Returns (y fp32, x_T)."""
  d = u.shape[2]
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  return _scan_block(f32(u), f32(delta), f32(A), per_channel(B, d), per_channel(C, d), f32(x0))


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[b, t_pad, ...] -> [t_pad / chunk, b, chunk, ...] (time padded with zeros first)."""
  b, t = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, -t % chunk)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)


def scan_chunked(u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
                 B: Float[Array, "b t n"] | Float[Array, "b t g n"],
                 C: Float[Array, "b t n"] | Float[Array, "b t g n"], x0: Float[Array, "b d n"],
                 chunk_size: int = DEFAULT_CHUNK):
  """The bare scan chunk by chunk. Time is padded with delta = u = 0, which leaves the
  state unchanged. Returns (y fp32 [b, t, d], x_T)."""
  b, t, d = u.shape
  chunk = min(chunk_size, t)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  xs = tuple(_chunks(a, chunk) for a in (f32(u), f32(delta), per_channel(B, d), per_channel(C, d)))

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def step(x, inputs):
    u_c, delta_c, B_c, C_c = inputs
    y, x = _unrolled_block(u_c, delta_c, f32(A), B_c, C_c, x)
    return x, y

  x_final, y = jax.lax.scan(step, f32(x0), xs)
  return jnp.moveaxis(y, 0, 1).reshape(b, -1, d)[:, :t], x_final
