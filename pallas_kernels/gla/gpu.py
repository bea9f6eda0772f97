"""Pallas GPU kernels for gated linear attention (Triton lowering), parallel over chunks.

The chunk kernels run one program per (batch, head, chunk), as flash-linear-attention's
``chunk_gla`` does, with the per-chunk math of `common` (sub-blocks of ``SUB`` rows,
the transposed state Sᵀ [dv, dk]); the only sequential part, the state passed from chunk
to chunk, is the light `chunk_states` kernel between them::

  gla_chunk_state  (k ⊙ exp(G_last - G))ᵀ v           the chunk's state from a zero start
  state passing    S_{c+1} = exp(G_last,c) ⊙ S_c + that  the state entering every chunk
  gla_fwd          o from the state the chunk is entered with

and backward: ``gla_state_grad`` (doᵀ (q ⊙ exp(G)), what the outputs send to the
entering state), the reverse state passing (the gradient of the state leaving every
chunk, and of the initial state), then ``gla_bwd``, ``gla_bwd_k``
and ``gla_bwd_v`` (dq and q ⊙ dq, dk and k ⊙ dk, dv of every chunk; dG = q ⊙ dq - k ⊙ dk).

Layout is the public ``[b, t, h, d]`` with t padded to the chunk and dk, dv to powers of
two >= 16; the saved states are Sᵀ [b, h, chunks, dv_pad, dk_pad] fp32. Matmul operands
follow `tile_matmul.TileMatmul.for_gpu`: the fp32 path without tensor cores spilled tens
of kilobytes per thread in these kernels, and (when the state was carried across a loop
over the chunks) took minutes to compile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_states import states_entering_chunks
from pallas_kernels.gla.common import (chunk_added_state, chunk_k_grads, chunk_outputs, chunk_q_grads,
                                       chunk_state_grad, chunk_v_grads, pad_axis, pow2)
from pallas_kernels.tile_matmul import TileMatmul


# The longest chunk per input dtype (fp32 or not). Measured with ptxas for H100 and A100
# at dk 64, dv 128, 8 warps: bf16 spills nothing at 64; the fp32 gradient kernels (three
# TF32 passes split both operands) spill 4-24 bytes at 32 and nothing at 16.
MAX_CHUNK = {False: 64, True: 16}


@dataclasses.dataclass(frozen=True)
class Launch:
  """Triton launch parameters of the chunk kernels (with 4 warps the gradient kernels
  spilled at chunk 64)."""

  num_warps: int = 8
  num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class _Chunk:
  c: int  # steps
  scale: float
  mm: TileMatmul


def _chunk_state_kernel(k_ref, v_ref, g_ref, added_ref, *, ch: _Chunk):
  added_ref[...] = chunk_added_state(k_ref, v_ref, g_ref, 0, ch.c, ch.mm)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, S_ref, o_ref, *, ch: _Chunk):
  chunk_outputs(q_ref, k_ref, v_ref, g_ref, o_ref, S_ref[...], 0, ch.c, ch.scale, ch.mm)


def _state_grad_kernel(q_ref, g_ref, do_ref, sent_ref, *, ch: _Chunk):
  sent_ref[...] = chunk_state_grad(q_ref, g_ref, do_ref, 0, ch.c, ch.scale, ch.mm)


def _backward_q_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, S_ref, dq_ref, dgq_ref, *, ch: _Chunk):
  chunk_q_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dgq_ref, S_ref, 0, ch.c, ch.scale, ch.mm)


def _backward_k_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dS_ref, dk_ref, dgk_ref, *, ch: _Chunk):
  chunk_k_grads(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dgk_ref, dS_ref, 0, ch.c, ch.scale, ch.mm)


def _backward_v_kernel(q_ref, k_ref, g_ref, do_ref, dS_ref, dv_ref, *, ch: _Chunk):
  chunk_v_grads(q_ref, k_ref, g_ref, do_ref, dv_ref, dS_ref[...], 0, ch.c, ch.scale, ch.mm)


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


def _chunk_decays(g: jax.Array, c: int) -> jax.Array:
  """exp(G_last) of every chunk [b, h, chunks, dk_pad] from the chunk-local G [b, t_pad, h, dk_pad]."""
  b, t_pad, h, dk = g.shape
  return jnp.exp(jnp.moveaxis(g.reshape(b, t_pad // c, c, h, dk)[:, :, -1], 2, 1))


def _caller(b: int, h: int, n: int, c: int, dk: int, dv: int, scale: float, dtype, launch: Launch, interpret):
  """(call(kernel, in_specs, out_specs, out_shape, name) on the grid (b, h, chunks), specs)."""
  ch = _Chunk(c, scale, TileMatmul.for_gpu(dtype, bool(interpret)))
  steps = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, ci: (i, ci, j, 0))  # noqa: E731
  state = pl.BlockSpec((None, None, None, dv, dk), lambda i, j, ci: (i, j, ci, 0, 0))
  specs = {"k": steps(dk), "v": steps(dv), "state": state}

  def call(kernel, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        functools.partial(kernel, ch=ch),
        grid=(b, h, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
        interpret=interpret, name=name)

  return call, specs


def forward(q, k, v, g, s0, scale: float, c: int, launch: Launch, interpret):
  """o [b, t, h, dv], final state [b, h, dk, dv] and the states entering each chunk (the
  residual for the backward: [b, h, chunks, dv_pad, dk_pad], fp32). ``g`` is the
  chunk-local cumsum of log_g, fp32, padded to whole chunks."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qp, kp, vp, gp = (_to_kernel(x, t_pad) for x in (q, k, v, g))
  call, sp = _caller(b, h, n, c, _width(dk), _width(dv), scale, q.dtype, launch, interpret)
  states_shape = jax.ShapeDtypeStruct((b, h, n, _width(dv), _width(dk)), jnp.float32)
  added = call(_chunk_state_kernel, [sp["k"], sp["v"], sp["k"]], sp["state"], states_shape,
               "gla_chunk_state")(kp, vp, gp)
  states, final = states_entering_chunks(_chunk_decays(gp, c), added, _state_to_kernel(s0), interpret=interpret)
  o = call(_forward_kernel, [sp["k"], sp["k"], sp["v"], sp["k"], sp["state"]], sp["v"],
           jax.ShapeDtypeStruct(vp.shape, q.dtype), "gla_fwd")(qp, kp, vp, gp, states)
  return o[:, :t, :, :dv], _state_from_kernel(final, dk, dv), states


def backward(q, k, v, g, states, do, dfinal, scale: float, c: int, launch: Launch, interpret):
  """dq, dk, dv (input dtypes), dG = q ⊙ dq - k ⊙ dk [b, t, h, dk] fp32 and d(initial
  state) [b, h, dk, dv]."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  t_pad = g.shape[1]
  n = t_pad // c
  qp, kp, vp, gp, dop = (_to_kernel(x, t_pad) for x in (q, k, v, g, do))
  call, sp = _caller(b, h, n, c, _width(dk), _width(dv), scale, q.dtype, launch, interpret)
  sent = call(_state_grad_kernel, [sp["k"], sp["k"], sp["v"]], sp["state"],
              jax.ShapeDtypeStruct(states.shape, jnp.float32), "gla_state_grad")(qp, gp, dop)
  dleaving, ds0 = states_entering_chunks(_chunk_decays(gp, c), sent, _state_to_kernel(dfinal), reverse=True,
                                         interpret=interpret)
  ins, ins_specs = (qp, kp, vp, gp, dop), [sp["k"], sp["k"], sp["v"], sp["k"], sp["v"]]
  dg_shape = jax.ShapeDtypeStruct(gp.shape, jnp.float32)
  dq, dgq = call(_backward_q_kernel, [*ins_specs, sp["state"]], [sp["k"], sp["k"]],
                 [jax.ShapeDtypeStruct(qp.shape, q.dtype), dg_shape], "gla_bwd")(*ins, states)
  dk_, dgk = call(_backward_k_kernel, [*ins_specs, sp["state"]], [sp["k"], sp["k"]],
                  [jax.ShapeDtypeStruct(kp.shape, k.dtype), dg_shape], "gla_bwd_k")(*ins, dleaving)
  dv_ = call(_backward_v_kernel, [sp["k"], sp["k"], sp["k"], sp["v"], sp["state"]], sp["v"],
             jax.ShapeDtypeStruct(vp.shape, v.dtype), "gla_bwd_v")(qp, kp, gp, dop, dleaving)
  unpad = lambda x, d: x[:, :t, :, :d]  # noqa: E731
  return (unpad(dq, dk), unpad(dk_, dk), unpad(dv_, dv), unpad(dgq - dgk, dk),
          _state_from_kernel(ds0, dk, dv))
