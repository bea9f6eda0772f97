"""Mosaic TPU kernels: the chunked forward (saving chunk-boundary states) and the
backward, which walks the chunks in reverse carrying dS.

Layout inside the kernels is ``[b, h, t, d]`` with t padded to the chunk and dk, dv to
multiples of 128, so every block's last two dims are (chunk, 128·n) or a whole state.
The grid is (b, h, chunks); the chunk axis is sequential (``arbitrary``) and the
transposed state Sᵀ [dv, dk] (or its gradient) lives in fp32 VMEM scratch across it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gla.common import backward_chunk, forward_chunk, pad_axis, round_up

LANES = 128


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, states_ref, final_ref, state, *,
                    c: int, scale: float):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    state[...] = s0_ref[...]

  states_ref[...] = state[...]
  state[...] = forward_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, state[...], 0, c, scale)

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    final_ref[...] = state[...]


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dfinal_ref, dq_ref, dk_ref,
                     dv_ref, dg_ref, ds0_ref, dstate, *, c: int, scale: float):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    dstate[...] = dfinal_ref[...]

  dstate[...] = backward_chunk(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                               states_ref[...], dstate[...], 0, c, scale)

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    ds0_ref[...] = dstate[...]


def _to_kernel(x: jax.Array, t_pad: int) -> jax.Array:
  """[b, t, h, d] -> [b, h, t_pad, d_pad]."""
  d_pad = round_up(x.shape[-1], LANES)
  return pad_axis(pad_axis(x, 1, t_pad), 3, d_pad).transpose(0, 2, 1, 3)


def _state_to_kernel(s: jax.Array) -> jax.Array:
  """[b, h, dk, dv] -> Sᵀ [b, h, dv_pad, dk_pad]."""
  s = s.swapaxes(2, 3)
  return pad_axis(pad_axis(s, 2, round_up(s.shape[2], LANES)), 3, round_up(s.shape[3], LANES))


def _from_kernel(x: jax.Array, t: int, d: int) -> jax.Array:
  return x.transpose(0, 2, 1, 3)[:, :t, :, :d]


def _state_from_kernel(s: jax.Array, dk: int, dv: int) -> jax.Array:
  return s.swapaxes(2, 3)[:, :, :dk, :dv]


def _specs(c: int, n: int, dk: int, dv: int, reverse: bool):
  chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
  rows = lambda d: pl.BlockSpec((None, None, c, d), lambda b, h, i: (b, h, chunk(i), 0))  # noqa: E731
  whole = pl.BlockSpec((None, None, dv, dk), lambda b, h, i: (b, h, 0, 0))
  per_chunk = pl.BlockSpec((None, None, None, dv, dk), lambda b, h, i: (b, h, chunk(i), 0, 0))
  return rows(dk), rows(dv), whole, per_chunk


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(q, k, v, g, s0, scale: float, c: int, interpret):
  """o [b, t, h, dv], final state [b, h, dk, dv] and the states entering each chunk (the
  residual for the backward: [b, h, chunks, dv_pad, dk_pad], fp32). ``g`` is the
  chunk-local cumsum of log_g, fp32, padded to whole chunks."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qk_spec, v_spec, whole, per_chunk = _specs(c, n, round_up(dk, LANES), round_up(dv, LANES), False)
  s0 = _state_to_kernel(s0)
  o, states, final = pl.pallas_call(
      functools.partial(_forward_kernel, c=c, scale=scale),
      grid=(b, h, n),
      in_specs=[qk_spec, qk_spec, v_spec, qk_spec, whole],
      out_specs=[v_spec, per_chunk, whole],
      out_shape=[jax.ShapeDtypeStruct((b, h, t_pad, s0.shape[2]), q.dtype),
                 jax.ShapeDtypeStruct((b, h, n, *s0.shape[2:]), jnp.float32),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
      scratch_shapes=[pltpu.VMEM(s0.shape[2:], jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="gla_fwd",
  )(*(_to_kernel(x, t_pad) for x in (q, k, v, g)), s0)
  return _from_kernel(o, t, dv), _state_from_kernel(final, dk, dv), states


def backward(q, k, v, g, states, do, dfinal, scale: float, c: int, interpret):
  """dq, dk, dv (input dtypes), dG = q ⊙ dq - k ⊙ dk [b, t, h, dk] fp32 and d(initial
  state) [b, h, dk, dv]."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qk_spec, v_spec, whole, per_chunk = _specs(c, n, round_up(dk, LANES), round_up(dv, LANES), True)
  dfinal = _state_to_kernel(dfinal)
  ins = [_to_kernel(x, t_pad) for x in (q, k, v, g, do)]
  dq, dk_, dv_, dg, ds0 = pl.pallas_call(
      functools.partial(_backward_kernel, c=c, scale=scale),
      grid=(b, h, n),
      in_specs=[qk_spec, qk_spec, v_spec, qk_spec, v_spec, per_chunk, whole],
      out_specs=[qk_spec, qk_spec, v_spec, qk_spec, whole],
      out_shape=[jax.ShapeDtypeStruct(ins[0].shape, q.dtype), jax.ShapeDtypeStruct(ins[1].shape, k.dtype),
                 jax.ShapeDtypeStruct(ins[2].shape, v.dtype), jax.ShapeDtypeStruct(ins[3].shape, jnp.float32),
                 jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)],
      scratch_shapes=[pltpu.VMEM(dfinal.shape[2:], jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="gla_bwd",
  )(*ins, states, dfinal)
  return (_from_kernel(dq, t, dk), _from_kernel(dk_, t, dk), _from_kernel(dv_, t, dv),
          _from_kernel(dg, t, dk), _state_from_kernel(ds0, dk, dv))
