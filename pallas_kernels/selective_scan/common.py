"""The selective scan's pieces shared by the fast paths (the sequential and chunked
scans in ``xla.py``/``ops.py`` and the Pallas kernels): the softplus and bias of delta,
the skip and gate, per-channel B and C, the plain sequential scan, and one step of the
recurrence and its adjoint in the kernels' layout (state ``[n, d_tile]``). The
reference (``reference.py``) is written apart from all of these."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def effective_delta(delta: Float[Array, "b t d"], delta_bias: Float[Array, "d"] | None,
                    softplus: bool) -> Float[Array, "b t d"]:
  """softplus(delta + delta_bias) in fp32, each part only when asked."""
  delta = delta.astype(jnp.float32)
  if delta_bias is not None:
    delta = delta + delta_bias.astype(jnp.float32)[None, None]
  return jax.nn.softplus(delta) if softplus else delta


def skip_and_gate(y: Float[Array, "b t d"], u: Float[Array, "b t d"], D: Float[Array, "d"] | None,
                  z: Float[Array, "b t d"] | None) -> Float[Array, "b t d"]:
  """(y + D u) * silu(z) in fp32, each part only when given."""
  y = y.astype(jnp.float32)
  if D is not None:
    y = y + u.astype(jnp.float32) * D.astype(jnp.float32)[None, None]
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y


def per_channel(bc: Float[Array, "b t n"] | Float[Array, "b t g n"], d: int) -> Float[Array, "b t #d n"]:
  """B or C as [b, t, d, n] (grouped: channel c reads group c // (d // g)) or, when not
  grouped, [b, t, 1, n] broadcasting over channels."""
  bc = bc.astype(jnp.float32)
  if bc.ndim == 3:
    return bc[:, :, None, :]
  return jnp.repeat(bc, d // bc.shape[2], axis=2)


def scan_sequential(
    u: Float[Array, "b t d"], delta: Float[Array, "b t d"], A: Float[Array, "d n"],
    B: Float[Array, "b t n"] | Float[Array, "b t g n"], C: Float[Array, "b t n"] | Float[Array, "b t g n"],
    x0: Float[Array, "b d n"],
) -> tuple[Float[Array, "b t d"], Float[Array, "b d n"]]:
  """The bare scan: y_t = C_t · x_t without skip or gate, fp32. Returns (y [b, t, d],
  x_T [b, d, n])."""
  d = u.shape[2]
  A = A.astype(jnp.float32)

  def step(x, inputs):
    u_t, delta_t, B_t, C_t = inputs  # [b, d], [b, d], [b, d|1, n], [b, d|1, n]
    x = jnp.exp(delta_t[..., None] * A[None]) * x + (delta_t * u_t)[..., None] * B_t
    return x, jnp.sum(x * C_t, axis=-1)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
  xs = (time_major(u.astype(jnp.float32)), time_major(delta.astype(jnp.float32)),
        time_major(per_channel(B, d)), time_major(per_channel(C, d)))
  x_final, y = jax.lax.scan(step, x0.astype(jnp.float32), xs)
  return time_major(y), x_final


# One step in the kernels' layout: state x [n, dt]; rows [1, dt] (per channel); columns
# [n, 1] (per state); A [n, dt]. All fp32.


def forward_step(x, u, delta, A, b, c):
  """x_t = exp(delta_t A) x_{t-1} + delta_t u_t B_t and y_t = C_t · x_t (a [1, dt] row)."""
  x = jnp.exp(delta * A) * x + b * (delta * u)
  return x, jnp.sum(c * x, axis=0, keepdims=True)


def backward_step(h, x_prev, dy, u, delta, A, b, c):
  """The adjoint of `forward_step` at one time step. ``h`` is dL/dx_t from later steps
  (and the final-state cotangent); with g = h + C_t dy_t (all of dL/dx_t):

    du_t = Σ_n g δ_t B_t,   dδ_t = Σ_n g (A a_t x_{t-1} + B_t u_t),   dA += g δ_t a_t x_{t-1},
    dB_t = Σ_d g δ_t u_t,   dC_t = Σ_d x_t dy_t,                       dL/dx_{t-1} = a_t g,

  with a_t = exp(δ_t A). Returns (dL/dx_{t-1}, du row, dδ row, dA term, dB column, dC column);
  dB and dC are partial sums over this channel tile.
  """
  a = jnp.exp(delta * A)
  x = a * x_prev + b * (delta * u)
  g = h + c * dy
  g_delta = g * delta
  g_ax = g * a * x_prev
  du = jnp.sum(g_delta * b, axis=0, keepdims=True)
  ddelta = jnp.sum(g_ax * A + g * b * u, axis=0, keepdims=True)
  db = jnp.sum(g_delta * u, axis=1, keepdims=True)
  dc = jnp.sum(x * dy, axis=1, keepdims=True)
  return a * g, du, ddelta, g_ax * delta, db, dc
