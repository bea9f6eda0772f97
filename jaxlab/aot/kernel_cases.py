"""The Pallas kernels at the shapes jaxlab's models call them with, as compile cases:
each kernel's public op with ``implementation=None`` (the per-platform dispatch), its
forward and its gradient, and the Pallas kernels each compiled program must contain,
which is what shows a dispatch that fell back to XLA. One table for
tests/pallas_kernels/test_compile_targets.py and
experiments/benchmarks/kernel_compile_report.py."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlab.aot.targets import Target
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.gla.ops import gla
from pallas_kernels.gmm.ops import gmm
from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd

F32, BF16 = jnp.float32, jnp.bfloat16
PROGRAMS = ("forward", "gradient")


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """``op(*inputs)`` returns an array or a tuple of arrays; ``forward_kernels`` are the
  Pallas kernels its forward must contain, ``backward_kernels`` those its gradient must
  (the gradient of a sum need not run the forward's output kernel: the chunk-parallel
  GPU kernels leave it out)."""

  op: Callable
  inputs: tuple[tuple[tuple[int, ...], jax.typing.DTypeLike], ...]  # (shape, dtype) per input
  forward_kernels: tuple[str, ...]
  backward_kernels: tuple[str, ...]

  def function(self, program: str) -> Callable:
    """The forward, or the gradient of a float32 sum of the outputs in every input."""
    if program == "forward":
      return self.op

    def loss(*args):
      return sum(x.astype(F32).sum() for x in jax.tree.leaves(self.op(*args)))

    return jax.grad(loss, argnums=tuple(range(len(self.inputs))))

  def kernels(self, program: str) -> set[str]:
    return set(self.backward_kernels if program == "gradient" else self.forward_kernels)


def attention(t: int, s: int, heads: tuple[int, int], d: int, dtype, **options) -> KernelCase:
  """q [2, t, hq, d] over k, v [2, s, hkv, d]; queries sit at the last t of s positions."""
  hq, hkv = heads
  return KernelCase(
      lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=None, **options),
      (((2, t, hq, d), dtype), ((2, s, hkv, d), dtype), ((2, s, hkv, d), dtype)),
      ("flash_attention_fwd",), ("flash_attention_dq", "flash_attention_dkv"))


def mamba_scan(dtype, groups: int | None, b: int = 2, t: int = 2048, d: int = 1536, n: int = 16) -> KernelCase:
  """Mamba-1 (d_inner 1536, state 16) with every option on: D, gate, Δ bias and
  softplus, initial and final state."""
  bc = (b, t, n) if groups is None else (b, t, groups, n)

  def op(u, delta, z, A, B, C, D, bias, x0):
    return selective_scan(u, delta, A, B, C, D, z, bias, True, x0, True, None)

  return KernelCase(
      op, (((b, t, d), dtype), ((b, t, d), dtype), ((b, t, d), dtype), ((d, n), F32), (bc, dtype),
           (bc, dtype), ((d,), F32), ((d,), F32), ((b, d, n), F32)),
      ("selective_scan_fwd",), ("selective_scan_bwd",))


def mamba2_ssd(dtype, b: int = 2, t: int = 2048, h: int = 8, g: int = 1, p: int = 64, n: int = 128,
               chunk: int = 256) -> KernelCase:
  """Mamba-2's defaults (head_dim 64, state 128, chunk 256) with D and both states."""

  def op(x, dt, A, B, C, D, s0):
    return ssd(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk, return_final_state=True,
               implementation=None)

  return KernelCase(
      op, (((b, t, h, p), dtype), ((b, t, h), dtype), ((h,), F32), ((b, t, g, n), dtype),
           ((b, t, g, n), dtype), ((h,), F32), ((b, h, p, n), F32)),
      ("ssd_fwd",), ("ssd_bwd",))


def gated_linear_attention(dtype, b: int = 2, t: int = 2048, h: int = 8, dk: int = 64,
                           dv: int = 128) -> KernelCase:
  """fla's GLA layer as jaxlab's model builds it: keys half as wide as values
  (expand_k 0.5), 8 heads, both states."""

  def op(q, k, v, log_g, s0):
    return gla(q, k, v, log_g, initial_state=s0, return_final_state=True, implementation=None)

  qk = ((b, t, h, dk), dtype)
  return KernelCase(op, (qk, qk, ((b, t, h, dv), dtype), qk, ((b, h, dk, dv), F32)),
                    ("gla_fwd",), ("gla_bwd",))


def grouped_matmul(dtype, m: int = 4096, k: int = 1024, n: int = 2048,
                   sizes: tuple[int, ...] = (700, 0, 512, 1, 900, 683, 300, 1000)) -> KernelCase:
  """An MoE layer's expert matmul: 4096 token copies over 8 experts, skewed, one empty."""
  group_sizes = np.asarray(sizes, np.int32)
  return KernelCase(lambda lhs, rhs: gmm(lhs, rhs, jnp.asarray(group_sizes), implementation=None),
                    (((m, k), dtype), ((len(sizes), k, n), dtype)), ("gmm",), ("tgmm",))


CASES = {
    "attention_gqa_bf16": attention(4096, 4096, (8, 2), 128, BF16),
    "attention_window_softcap_f32": attention(2048, 2048, (4, 4), 64, F32, sliding_window=512,
                                              logit_soft_cap=30.0),
    "attention_prefill_mqa_f32": attention(512, 2048, (8, 1), 128, F32),
    "attention_long_bf16_d64": attention(8192, 8192, (8, 8), 64, BF16),
    "selective_scan_f32": mamba_scan(F32, None),
    "selective_scan_bf16_groups": mamba_scan(BF16, 4),
    "ssd_f32": mamba2_ssd(F32),
    "ssd_bf16": mamba2_ssd(BF16),
    "gla_f32": gated_linear_attention(F32),
    "gla_bf16": gated_linear_attention(BF16),
    "gmm_f32": grouped_matmul(F32),
    "gmm_bf16": grouped_matmul(BF16),
}


def compile_case(case: KernelCase, program: str, target: Target,
                 compiler_options: dict | None = None) -> tuple[jax.stages.Compiled, float]:
  """``case``'s forward or gradient lowered and compiled for ``target``'s devices (inputs
  replicated over them), with XLA ``compiler_options``, and the seconds that took."""
  replicated = NamedSharding(jax.sharding.Mesh(np.array(target.devices), ("d",)), P())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in case.inputs]
  start = time.perf_counter()
  compiled = jax.jit(case.function(program)).lower(*args).compile(compiler_options)
  return compiled, time.perf_counter() - start
