"""Pallas GPU kernels (Triton lowering): the chunked forward (saving chunk-boundary
states) and the backward, which walks the chunks in reverse carrying dS.

Layout is the public ``[b, t, h, d]`` with t padded to the chunk and dk, dv to powers of
two >= 16. Each program owns one (batch, head) and loops over the chunks in order (in
reverse for the backward), the transposed state Sᵀ [dv, dk] (or its gradient) carried
in fp32 registers; chunk and sub-block sizes are powers of two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gla.common import backward_chunk, forward_chunk, pad_axis, pow2


@dataclasses.dataclass(frozen=True)
class Launch:
  num_warps: int = 4
  num_stages: int = 2


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, states_ref, final_ref, *, c: int,
                    n: int, scale: float):
  def body(i, state_t):
    states_ref[i] = state_t
    return forward_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, state_t, i * c, c, scale)

  final_ref[...] = jax.lax.fori_loop(0, n, body, s0_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dfinal_ref, dq_ref, dk_ref,
                     dv_ref, dg_ref, ds0_ref, *, c: int, n: int, scale: float):
  def body(i, dstate_t):
    chunk = n - 1 - i
    return backward_chunk(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                          states_ref[chunk], dstate_t, chunk * c, c, scale)

  ds0_ref[...] = jax.lax.fori_loop(0, n, body, dfinal_ref[...])


def _width(d: int) -> int:
  return max(16, pow2(d))


def _to_kernel(x: jax.Array, t_pad: int) -> jax.Array:
  return pad_axis(pad_axis(x, 1, t_pad), 3, _width(x.shape[-1]))


def _state_to_kernel(s: jax.Array) -> jax.Array:
  """[b, h, dk, dv] -> Sᵀ [b, h, dv_pad, dk_pad]."""
  s = s.swapaxes(2, 3)
  return pad_axis(pad_axis(s, 2, _width(s.shape[2])), 3, _width(s.shape[3]))


def _state_from_kernel(s: jax.Array, dk: int, dv: int) -> jax.Array:
  return s.swapaxes(2, 3)[:, :, :dk, :dv]


def _specs(t_pad: int, n: int, dk: int, dv: int):
  seq = lambda d: pl.BlockSpec((None, t_pad, None, d), lambda b, h: (b, 0, h, 0))  # noqa: E731
  whole = pl.BlockSpec((None, None, dv, dk), lambda b, h: (b, h, 0, 0))
  states = pl.BlockSpec((None, None, n, dv, dk), lambda b, h: (b, h, 0, 0, 0))
  return seq(dk), seq(dv), whole, states


def _call(kernel, b: int, h: int, in_specs, out_specs, out_shape, launch: Launch, interpret, name):
  return pl.pallas_call(
      kernel, grid=(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
      interpret=interpret, name=name,
  )


def forward(q, k, v, g, s0, scale: float, c: int, launch: Launch, interpret):
  """o [b, t, h, dv], final state [b, h, dk, dv] and the states entering each chunk (the
  residual for the backward: [b, h, chunks, dv_pad, dk_pad], fp32). ``g`` is the
  chunk-local cumsum of log_g, fp32, padded to whole chunks."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qk_spec, v_spec, whole, states_spec = _specs(t_pad, n, _width(dk), _width(dv))
  s0 = _state_to_kernel(s0)
  ins = [_to_kernel(x, t_pad) for x in (q, k, v, g)]
  o, states, final = _call(
      functools.partial(_forward_kernel, c=c, n=n, scale=scale), b, h,
      [qk_spec, qk_spec, v_spec, qk_spec, whole], [v_spec, states_spec, whole],
      [jax.ShapeDtypeStruct(ins[2].shape, q.dtype),
       jax.ShapeDtypeStruct((b, h, n, *s0.shape[2:]), jnp.float32),
       jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
      launch, interpret, "gla_fwd",
  )(*ins, s0)
  return o[:, :t, :, :dv], _state_from_kernel(final, dk, dv), states


def backward(q, k, v, g, states, do, dfinal, scale: float, c: int, launch: Launch, interpret):
  """dq, dk, dv (input dtypes), dG = q ⊙ dq - k ⊙ dk [b, t, h, dk] fp32 and d(initial
  state) [b, h, dk, dv]."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qk_spec, v_spec, whole, states_spec = _specs(t_pad, n, _width(dk), _width(dv))
  dfinal = _state_to_kernel(dfinal)
  ins = [_to_kernel(x, t_pad) for x in (q, k, v, g, do)]
  dq, dk_, dv_, dg, ds0 = _call(
      functools.partial(_backward_kernel, c=c, n=n, scale=scale), b, h,
      [qk_spec, qk_spec, v_spec, qk_spec, v_spec, states_spec, whole],
      [qk_spec, qk_spec, v_spec, qk_spec, whole],
      [jax.ShapeDtypeStruct(ins[0].shape, q.dtype), jax.ShapeDtypeStruct(ins[1].shape, k.dtype),
       jax.ShapeDtypeStruct(ins[2].shape, v.dtype), jax.ShapeDtypeStruct(ins[3].shape, jnp.float32),
       jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)],
      launch, interpret, "gla_bwd",
  )(*ins, states, dfinal)
  unpad = lambda x, d: x[:, :t, :, :d]  # noqa: E731
  return unpad(dq, dk), unpad(dk_, dk), unpad(dv_, dv), unpad(dg, dk), _state_from_kernel(ds0, dk, dv)
