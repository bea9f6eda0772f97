"""Public entry point: `gla`, with implementation dispatch, a custom VJP over the Pallas
kernels, and a shard_map wrapper under an active mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from pallas_kernels.gla import gpu, tpu
from pallas_kernels.gla.common import SUB, chunk_len, local_cumsum, pad_axis, reverse_cumsum, round_up
from pallas_kernels.gla.xla import gla_sequential, gla_xla
from pallas_kernels.dispatch import choose, resolve_interpret_backend

IMPLEMENTATIONS = (None, "xla", "sequential", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class _Kernel:
  backend: str  # "tpu" | "gpu"
  scale: float
  chunk: int
  interpret: bool

  def _args(self):
    if self.backend == "tpu":
      return tpu, (self.scale, self.chunk, pltpu.InterpretParams() if self.interpret else False)
    return gpu, (self.scale, self.chunk, gpu.Launch(), self.interpret)

  def forward(self, q, k, v, g, s0):
    module, args = self._args()
    return module.forward(q, k, v, g, s0, *args)

  def backward(self, q, k, v, g, states, do, dfinal):
    module, args = self._args()
    return module.backward(q, k, v, g, states, do, dfinal, *args)


def _chunk_local_g(log_g: jax.Array, chunk: int) -> Float[Array, "b t_pad h dk"]:
  return local_cumsum(pad_axis(log_g, 1, round_up(log_g.shape[1], chunk)), chunk, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas_gla(q, k, v, log_g, s0, kernel: _Kernel):
  return _pallas_forward(q, k, v, log_g, s0, kernel)[0]


def _pallas_forward(q, k, v, log_g, s0, kernel: _Kernel):
  o, final, states = kernel.forward(q, k, v, _chunk_local_g(log_g, kernel.chunk), s0)
  return (o, final), (q, k, v, log_g, states, final)


def _pallas_backward(kernel: _Kernel, residuals, cotangents):
  """dlog_g from the kernels' dG = q ⊙ dq - k ⊙ dk: log_g_s enters every cumulative gate
  G_t with t >= s, and the final state carries exp(G_T), hence
  dlog_g_s = Σ_{t>=s} dG_t + Σ_v (S_T ⊙ dS_T) (fla's chunk_gla backward)."""
  q, k, v, log_g, states, final = residuals
  do, dfinal = cotangents
  g = _chunk_local_g(log_g, kernel.chunk)
  dq, dk, dv, dg, ds0 = kernel.backward(q, k, v, g, states, do, dfinal)
  dlog_g = reverse_cumsum(dg, axis=1) + jnp.sum(final * dfinal, axis=-1)[:, None]
  return dq, dk, dv, dlog_g.astype(log_g.dtype), ds0


_pallas_gla.defvjp(_pallas_forward, _pallas_backward)


def _validate(q, k, v, log_g, scale, initial_state, chunk_size, implementation):
  if q.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q and v must be [batch, time, heads, dim]; got {q.shape} and {v.shape}")
  if k.shape != q.shape or log_g.shape != q.shape:
    raise ValueError(f"k {k.shape} and log_g {log_g.shape} must have q's shape {q.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v {v.shape} must agree with q {q.shape} in batch, time and heads")
  b, _, h, dk = q.shape
  state_shape = (b, h, dk, v.shape[3])
  if initial_state is not None and initial_state.shape != state_shape:
    raise ValueError(f"initial_state must be [b, h, dk, dv] = {state_shape}; got {initial_state.shape}")
  if scale is not None and not scale > 0:
    raise ValueError(f"scale={scale} must be > 0 (or None for dk**-0.5)")
  if chunk_size < SUB or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size={chunk_size} must be a power of two >= {SUB} (e.g. 64)")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}")


def gla(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    log_g: Float[Array, "b t h dk"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "b h dk dv"] | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
    interpret_backend: str | None = None,
    batch_axes: str | Sequence[str] | None = None,
    head_axes: str | Sequence[str] | None = None,
):
  """Gated linear attention (Yang et al. 2024; flash-linear-attention's layout and gate):
  ``S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``, with
  log_g <= 0 a per-key-dim log forget gate, state S [dk, dv] in fp32 starting from
  ``initial_state`` (zeros by default) and scale ``dk**-0.5`` by default. Returns o in
  q's dtype, or (o, final state [b, h, dk, dv] fp32) when ``return_final_state``.

  ``implementation``: ``"sequential"`` the plain recurrence step by step; ``"xla"``
  the chunked form in plain JAX; ``"pallas"`` the Mosaic kernel on TPU and the Pallas
  GPU kernel on GPU; ``"pallas_interpret"`` the same kernels in interpret mode
  (``interpret_backend``: `pallas_kernels.dispatch`); None chooses per platform at
  lowering time (TPU and GPU kernels, XLA elsewhere). Chunks have ``chunk_size`` steps
  (fewer for short sequences; on the GPU at most 64, and 16 for fp32 inputs). Under an active mesh the call runs inside ``shard_map``
  with batch split over ``batch_axes`` and heads over ``head_axes``.
  """
  _validate(q, k, v, log_g, scale, initial_state, chunk_size, implementation)
  interpret_backend = resolve_interpret_backend(interpret_backend)
  t, dk = q.shape[1], q.shape[3]
  scale = dk**-0.5 if scale is None else float(scale)
  chunk = chunk_len(t, chunk_size)

  def kernel(backend: str, interpret: bool):
    c = min(chunk, gpu.MAX_CHUNK[q.dtype == jnp.float32]) if backend == "gpu" else chunk
    return lambda *args: _pallas_gla(*args, _Kernel(backend, scale, c, interpret))

  chosen = choose(implementation, kernel, lambda *a: gla_xla(*a, scale, chunk), interpret_backend,
                  {"sequential": lambda *a: gla_sequential(*a, scale)})

  def run(q, k, v, log_g, s0):
    if s0 is None:  # local shapes: under shard_map these are the shard's
      s0 = jnp.zeros((q.shape[0], q.shape[2], dk, v.shape[3]), jnp.float32)
    return chosen(q, k, v, log_g, s0.astype(jnp.float32))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    o, final = run(q, k, v, log_g, initial_state)
  else:
    seq = P(batch_axes, None, head_axes, None)
    state = P(batch_axes, head_axes, None, None)
    o, final = jax.shard_map(
        run, in_specs=(seq, seq, seq, seq, None if initial_state is None else state),
        out_specs=(seq, state), check_vma=False)(q, k, v, log_g, initial_state)
  return (o, final) if return_final_state else o
