"""Public entry point: `ssd`, with implementation dispatch, a custom VJP over the Pallas
kernels, and a shard_map wrapper under an active mesh."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from pallas_kernels.dispatch import choose, resolve_interpret_backend
from pallas_kernels.ssd import gpu, tpu, xla
from pallas_kernels.ssd.xla import F32, expand_groups

IMPLEMENTATIONS = (None, "xla", "sequential", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class _Kernel:
  backend: str  # "tpu" | "gpu"
  chunk_size: int
  interpret: bool

  @property
  def module(self):
    return tpu if self.backend == "tpu" else gpu

  @property
  def interpret_arg(self):
    if not self.interpret:
      return False
    return pltpu.InterpretParams() if self.backend == "tpu" else True


def _group_sum(v: Float[Array, "b t h n"], groups: int) -> Float[Array, "b t g n"]:
  """Per-head dB / dC summed over the heads that share a group."""
  b, t, h, n = v.shape
  return v.reshape(b, t, groups, h // groups, n).sum(axis=3)


def _log_decay_grad(B, C, dB_h, dC_h, final, dfinal) -> Float[Array, "b t h"]:
  """d(dt_t A) from the gradients of B and C.

  With L_t = Σ_{k<=t} dt_k A, the output and final state depend on L only through
  C_t e^{L_t}, B_s e^{-L_s} and e^{L_T} (times the rest of the final state), so
  ∂/∂L_t = C_t·dC_t - B_t·dB_t (+ <d final, final> at t = T), and
  d(dt_t A) = Σ_{s>=t} ∂/∂L_s."""
  b, t, h, n = dB_h.shape
  g = B.shape[2]
  per_group = lambda v: v.reshape(b, t, g, h // g, n)  # noqa: E731
  dL = (C.astype(F32)[:, :, :, None] * per_group(dC_h) - B.astype(F32)[:, :, :, None] * per_group(dB_h))
  dL = dL.sum(axis=-1).reshape(b, t, h)
  dL = dL.at[:, -1].add(jnp.sum(dfinal * final, axis=(2, 3)))
  return jnp.flip(jnp.cumsum(jnp.flip(dL, 1), axis=1), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas_ssd(x, dt, A, B, C, D, s0, kernel: _Kernel):
  return _pallas_forward(x, dt, A, B, C, D, s0, kernel)[0]


def _pallas_forward(x, dt, A, B, C, D, s0, kernel: _Kernel):
  y, states, final = kernel.module.forward(x, dt, A, B, C, D, s0, kernel.chunk_size, kernel.interpret_arg)
  return (y, final), (x, dt, A, B, C, D, states, final)


def _pallas_backward(kernel: _Kernel, residuals, cotangents):
  x, dt, A, B, C, D, states, final = residuals
  dy, dfinal = cotangents
  dfinal = dfinal.astype(F32)
  dx, ddt_v, dB_h, dC_h, ds0 = kernel.module.backward(x, dt, A, B, C, D, states, dy, dfinal,
                                                      kernel.chunk_size, kernel.interpret_arg)
  dlog = _log_decay_grad(B, C, dB_h, dC_h, final, dfinal)
  ddt = ddt_v + dlog * A.astype(F32)[None, None, :]
  dA = jnp.sum(dlog * dt.astype(F32), axis=(0, 1))
  dD = jnp.einsum("bthp,bthp->h", dy.astype(F32), x.astype(F32))
  g = B.shape[2]
  return (dx, ddt.astype(dt.dtype), dA.astype(A.dtype), _group_sum(dB_h, g).astype(B.dtype),
          _group_sum(dC_h, g).astype(C.dtype), dD.astype(D.dtype), ds0)


_pallas_ssd.defvjp(_pallas_forward, _pallas_backward)


def _shards(mesh, axes: str | Sequence[str] | None) -> int:
  """How many pieces ``axes`` of ``mesh`` split a dimension into."""
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _validate(x, dt, A, B, C, D, initial_state, chunk_size, implementation):
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, time, heads, head_dim]; got shape {x.shape}")
  b, t, h, p = x.shape
  if t < 1:
    raise ValueError(f"x has an empty time axis (shape {x.shape}); pass at least one step")
  if dt.shape != (b, t, h):
    raise ValueError(f"dt must be [batch, time, heads] = {(b, t, h)}; got {dt.shape}")
  if A.shape != (h,):
    raise ValueError(f"A must be [heads] = ({h},); got {A.shape}")
  if B.ndim != 4 or B.shape[:2] != (b, t):
    raise ValueError(f"B must be [batch, time, groups, state] with batch, time = {(b, t)}; got {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"C must have B's shape {B.shape}; got {C.shape}")
  if h % B.shape[2]:
    raise ValueError(f"heads ({h}) must be a multiple of the groups of B and C ({B.shape[2]})")
  if D is not None and D.shape != (h,):
    raise ValueError(f"D must be [heads] = ({h},); got {D.shape}")
  if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
    raise ValueError(f"initial_state must be [batch, heads, head_dim, state] = {(b, h, p, B.shape[3])}; "
                     f"got {initial_state.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (64 or 256 are typical)")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}")


def ssd(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, "h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    *,
    chunk_size: int = 64,
    D: Float[Array, "h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
    return_final_state: bool = False,
    implementation: str | None = None,
    interpret_backend: str | None = None,
    batch_axes: str | Sequence[str] | None = None,
    head_axes: str | Sequence[str] | None = None,
):
  """Mamba-2's SSD layer recurrence, per batch row and head i (group i // (h // g))::

    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_tᵀ,    y_t = s_t C_t + D x_t

  with dt > 0 (already through softplus), A < 0 and the state s [b, h, p, n] in fp32
  (``initial_state`` or zeros). Returns y in x's dtype, or (y, final state) with
  ``return_final_state``. mamba_ssm's ``ssd_minimal_discrete(x·dt, A·dt, B, C)``
  computes the same with B and C repeated per head; its layout is ours.

  ``implementation``: ``"sequential"`` the step-by-step scan; ``"xla"`` the
  chunked matmul form in plain JAX; ``"pallas"`` the Mosaic kernel on TPU and the Pallas
  GPU kernel on GPU; ``"pallas_interpret"`` those kernels in interpret mode
  (``interpret_backend``: `pallas_kernels.dispatch`); None chooses per platform at
  lowering time (kernels on TPU and GPU, the XLA path elsewhere). ``chunk_size`` is the
  chunk length L (the kernels round it up to a multiple of 8 on TPU and to a power of
  two in [16, 64] on GPU, at most 32 for fp32 inputs); the kernels keep one state per
  chunk for the backward pass. Under an active mesh the call runs inside ``shard_map``
  with the batch split over ``batch_axes`` and heads over ``head_axes``.
  """
  _validate(x, dt, A, B, C, D, initial_state, chunk_size, implementation)
  interpret_backend = resolve_interpret_backend(interpret_backend)
  b, _, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  D = jnp.zeros((h,), F32) if D is None else D
  s0 = jnp.zeros((b, h, p, n), F32) if initial_state is None else initial_state.astype(F32)

  def kernel(backend: str, interpret: bool):
    return lambda *args: _pallas_ssd(*args, _Kernel(backend, chunk_size, interpret))

  run = choose(implementation, kernel, lambda *a: xla.ssd_xla(*a, chunk_size), interpret_backend,
               {"sequential": xla.ssd_sequential})

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    y, final = run(x, dt, A, B, C, D, s0)
  else:
    if g > 1 and g % _shards(mesh, head_axes):  # groups do not split with the heads
      B, C, g = expand_groups(B, h), expand_groups(C, h), h
    heads = P(batch_axes, None, head_axes, None)
    groups = P(batch_axes, None, None if g == 1 else head_axes, None)
    state = P(batch_axes, head_axes, None, None)
    y, final = jax.shard_map(
        run, in_specs=(heads, P(batch_axes, None, head_axes), P(head_axes), groups, groups,
                       P(head_axes), state),
        out_specs=(heads, state), check_vma=False)(x, dt, A, B, C, D, s0)
  return (y, final) if return_final_state else y
