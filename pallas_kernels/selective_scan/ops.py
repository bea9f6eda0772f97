"""Public entry point: `selective_scan`, with implementation dispatch, a custom VJP over
the Pallas kernels, and a shard_map wrapper under an active mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from pallas_kernels.dispatch import choose, resolve_interpret_backend
from pallas_kernels.selective_scan import gpu, tpu, xla
from pallas_kernels.selective_scan.common import effective_delta, scan_sequential, skip_and_gate

IMPLEMENTATIONS = (None, "sequential", "associative", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class _Kernel:
  backend: str  # "tpu" | "gpu"
  chunk: int | None
  interpret: bool

  @property
  def module(self):
    return tpu if self.backend == "tpu" else gpu

  def call_args(self):
    chunk = self.module.DEFAULT_CHUNK if self.chunk is None else self.chunk
    if self.backend == "tpu":
      return chunk, (pltpu.InterpretParams() if self.interpret else False)
    return chunk, self.interpret


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_scan(u, delta, A, B, C, x0, kernel: _Kernel):
  y, final, _ = kernel.module.forward(u, delta, A, B, C, x0, *kernel.call_args())
  return y, final


def _pallas_forward(u, delta, A, B, C, x0, kernel: _Kernel):
  y, final, bounds = kernel.module.forward(u, delta, A, B, C, x0, *kernel.call_args())
  return (y, final), (u, delta, A, B, C, bounds)


def _pallas_backward(kernel: _Kernel, residuals, cotangents):
  u, delta, A, B, C, bounds = residuals
  dy, dfinal = cotangents
  *grads, dx0 = kernel.module.backward(u, delta, A, B, C, bounds, dy, dfinal.astype(jnp.float32),
                                      *kernel.call_args())
  return (*(g.astype(x.dtype) for g, x in zip(grads, (u, delta, A, B, C))), dx0)


_pallas_scan.defvjp(_pallas_forward, _pallas_backward)


def _kernel_scan(u, delta, A, B, C, x0, kernel: _Kernel):
  """The Pallas scan with B and C in their grouped form [b, t, g, n]; y as fp32, like
  the other implementations (platform_dependent needs one output type)."""
  grouped = lambda x: x if x.ndim == 4 else x[:, :, None, :]  # noqa: E731
  y, final = _pallas_scan(u, delta, A, grouped(B), grouped(C), x0, kernel)
  return y.astype(jnp.float32), final


def _scan(u, delta, A, B, C, x0, implementation, chunk_size, interpret_backend):
  """The bare scan (y_t = C_t · x_t) by the chosen implementation: (y, final state)."""
  chunk_xla = xla.DEFAULT_CHUNK if chunk_size is None else chunk_size

  def kernel(backend: str, interpret: bool):
    return lambda *args: _kernel_scan(*args, _Kernel(backend, chunk_size, interpret=interpret))

  run = choose(implementation, kernel, lambda *a: xla.scan_chunked(*a, chunk_size=chunk_xla),
               interpret_backend, {"sequential": scan_sequential, "associative": xla.scan_associative})
  return run(u, delta, A, B, C, x0)


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, implementation, chunk_size):
  if u.ndim != 3 or u.shape[1] < 1:
    raise ValueError(f"u must be [batch, time, channels] with time >= 1; got shape {u.shape}")
  b, t, d = u.shape
  if delta.shape != u.shape:
    raise ValueError(f"delta must have u's shape {u.shape}; got {delta.shape}")
  if A.ndim != 2 or A.shape[0] != d:
    raise ValueError(f"A must be [channels, state] = ({d}, n); got {A.shape}")
  n = A.shape[1]
  if B.shape != C.shape:
    raise ValueError(f"B and C must have the same shape; got B {B.shape} and C {C.shape}")
  if B.shape not in ((b, t, n),) and not (B.ndim == 4 and B.shape[:2] == (b, t) and B.shape[3] == n):
    raise ValueError(f"B and C must be [b, t, n] = {(b, t, n)} or grouped [b, t, g, n]; got {B.shape}")
  if B.ndim == 4 and d % B.shape[2]:
    raise ValueError(f"channels ({d}) must be a multiple of the groups of B and C ({B.shape[2]})")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and x.shape != (d,):
      raise ValueError(f"{name} must be [channels] = ({d},); got {x.shape}")
  if z is not None and z.shape != u.shape:
    raise ValueError(f"z must have u's shape {u.shape}; got {z.shape}")
  if initial_state is not None and initial_state.shape != (b, d, n):
    raise ValueError(f"initial_state must be [b, d, n] = {(b, d, n)}; got {initial_state.shape}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (or None for the defaults)")


def selective_scan(
    u: Float[Array, "b t d"],
    delta: Float[Array, "b t d"],
    A: Float[Array, "d n"],
    B: Float[Array, "b t n"] | Float[Array, "b t g n"],
    C: Float[Array, "b t n"] | Float[Array, "b t g n"],
    D: Float[Array, "d"] | None = None,
    z: Float[Array, "b t d"] | None = None,
    delta_bias: Float[Array, "d"] | None = None,
    delta_softplus: bool = False,
    initial_state: Float[Array, "b d n"] | None = None,
    return_final_state: bool = False,
    implementation: str | None = None,
    *,
    chunk_size: int | None = None,
    interpret_backend: str | None = None,
    batch_axes: str | Sequence[str] | None = None,
    channel_axes: str | Sequence[str] | None = None,
):
  """mamba_ssm's ``selective_scan_ref`` (see reference.py), batch-major: u, delta, z
  ``[b, t, d]`` (mamba_ssm: ``[B D L]``), B and C ``[b, t, n]`` or ``[b, t, g, n]``
  (mamba_ssm: ``[B N L]``, ``[B G N L]``), states ``[b, d, n]``::

    delta = softplus(delta + delta_bias);  x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t
    y_t = (C_t · x_t + D u_t) * silu(z_t)

  Returns y in u's dtype, and the fp32 final state when ``return_final_state``.

  ``implementation``: ``"sequential"`` a ``lax.scan`` over time;
  ``"associative"`` one ``associative_scan`` over time; ``"xla"`` the chunked scan
  (the recurrence unrolled inside chunks, checkpointed per chunk); ``"pallas"`` the Mosaic kernel on
  TPU and the Pallas GPU kernel on GPU; ``"pallas_interpret"`` the same kernels in
  interpret mode (``interpret_backend``: `pallas_kernels.dispatch`); None chooses per
  platform at lowering time (TPU and GPU kernels, the chunked scan elsewhere).
  ``chunk_size``: the time chunk (None: 64 for TPU, 16 for "xla" and GPU; TPU rounds it
  up to a multiple of 8, or 16 for 16-bit inputs; the GPU backward unrolls one chunk, so
  keep it small there). The kernels save one fp32 state [b, d, n] per chunk for the
  backward pass. Softplus, bias, D and the gate run in
  plain JAX around the scan. Under an active mesh the call runs inside ``shard_map``
  with batch split over ``batch_axes`` and channels over ``channel_axes``.
  """
  _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, implementation, chunk_size)
  interpret_backend = resolve_interpret_backend(interpret_backend)

  def run(u, delta, A, B, C, D, z, delta_bias, x0):
    if x0 is None:
      x0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    delta = effective_delta(delta, delta_bias, delta_softplus)
    y, final = _scan(u, delta, A.astype(jnp.float32), B, C, x0.astype(jnp.float32),
                     implementation, chunk_size, interpret_backend)
    return skip_and_gate(y, u, D, z).astype(u.dtype), final

  args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    y, final = run(*args)
  else:
    rows = P(batch_axes, None, channel_axes)
    channels = P(channel_axes)
    grouped = B.ndim == 4 and B.shape[2] > 1
    bc = P(batch_axes, None, channel_axes, None) if grouped else P(batch_axes, *[None] * (B.ndim - 1))
    state = P(batch_axes, channel_axes, None)
    in_specs = (rows, rows, P(channel_axes, None), bc, bc, channels if D is not None else None,
                rows if z is not None else None, channels if delta_bias is not None else None,
                state if initial_state is not None else None)
    y, final = jax.shard_map(run, in_specs=in_specs, out_specs=(rows, state), check_vma=False)(*args)
  return (y, final) if return_final_state else y
