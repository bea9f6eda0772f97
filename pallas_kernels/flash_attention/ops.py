"""Public entry point: `flash_attention`, with implementation dispatch, a custom VJP
over the Pallas kernels, and a shard_map wrapper under an active mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_attention import gpu, tpu, xla
from pallas_kernels.flash_attention.common import MaskParams
from pallas_kernels.dispatch import choose, resolve_interpret_backend

IMPLEMENTATIONS = (None, "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes per backend; each field's defaults suit model-sized shapes."""

  tpu: tpu.BlockSizes = tpu.BlockSizes()
  gpu: gpu.BlockSizes = gpu.BlockSizes()
  xla_block_k: int = xla.DEFAULT_BLOCK_K


@dataclasses.dataclass(frozen=True)
class _Kernel:
  backend: str  # "tpu" | "gpu"
  params: MaskParams
  blocks: BlockSizes
  interpret: bool

  @property
  def module(self):
    return tpu if self.backend == "tpu" else gpu

  def call_args(self):
    if self.backend == "tpu":
      return self.blocks.tpu, (pltpu.InterpretParams() if self.interpret else False)
    return self.blocks.gpu, self.interpret


def _group_sum(x: jax.Array, kv_heads: int) -> jax.Array:
  """Per-query-head dk/dv [b, s, hq, d] summed over each kv head's group."""
  b, s, hq, d = x.shape
  return x.reshape(b, s, kv_heads, hq // kv_heads, d).sum(axis=3, dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_attention(q, k, v, q_seg, kv_seg, slopes, kernel: _Kernel):
  return _pallas_forward(q, k, v, q_seg, kv_seg, slopes, kernel)[0]


def _pallas_forward(q, k, v, q_seg, kv_seg, slopes, kernel: _Kernel):
  blocks, interpret = kernel.call_args()
  out, lse = kernel.module.forward(q, k, v, q_seg, kv_seg, slopes, kernel.params, blocks, interpret)
  return out, (q, k, v, q_seg, kv_seg, slopes, out, lse)


def _pallas_backward(kernel: _Kernel, residuals, dout):
  q, k, v, q_seg, kv_seg, slopes, out, lse = residuals
  blocks, interpret = kernel.call_args()
  dq, dk, dv = kernel.module.backward(q, k, v, q_seg, kv_seg, slopes, out, lse, dout,
                                      kernel.params, blocks, interpret)
  kv_heads = k.shape[2]
  return (dq, _group_sum(dk, kv_heads).astype(k.dtype), _group_sum(dv, kv_heads).astype(v.dtype),
          None, None, None)


_pallas_attention.defvjp(_pallas_forward, _pallas_backward)


def _validate(q, k, v, segment_ids, sliding_window, logit_soft_cap, alibi_slopes, implementation):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, time, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree in batch, length and heads")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
      raise ValueError(f"segment_ids must be ([b, t], [b, s]) = ({q.shape[:2]}, {k.shape[:2]}); "
                       f"got ({q_seg.shape}, {kv_seg.shape})")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1")
  if logit_soft_cap is not None and logit_soft_cap <= 0:
    raise ValueError(f"logit_soft_cap={logit_soft_cap} must be > 0")
  if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
    raise ValueError(f"alibi_slopes must be [query heads] = ({q.shape[2]},); got {alibi_slopes.shape}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; use one of {IMPLEMENTATIONS}")


def flash_attention(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b s hkv d"],
    v: Float[Array, "b s hkv dv"],
    *,
    causal: bool = False,
    segment_ids: tuple[Int[Array, "b t"], Int[Array, "b s"]] | None = None,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Float[Array, "hq"] | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret_backend: str | None = None,
    batch_axes: str | Sequence[str] | None = None,
    head_axes: str | Sequence[str] | None = None,
) -> Float[Array, "b t hq dv"]:
  """Attention of the t queries over the s keys without materializing [t, s]; values may
  have another width than queries and keys.

  Semantics (see common.py): query head i reads kv head ``i // (hq // hkv)``; query i
  sits at position ``i + s - t``; ``causal``, ``sliding_window`` (``0 <= q - k < w``)
  and ``segment_ids`` restrict what it sees; scores are ``scale · q·k`` (default
  ``1/sqrt(d)``), minus ``alibi_slopes[h] · |q_pos - k_pos|`` (constants, no gradient),
  soft-capped as ``cap · tanh(scores / cap)``; a query that sees no key returns zeros.

  ``implementation``: ``"xla"`` blocked online softmax in plain JAX; ``"pallas"`` the
  Mosaic kernel on TPU and the Pallas GPU kernel on GPU; ``"pallas_interpret"`` the
  same kernels in interpret mode (``interpret_backend`` picks ``"tpu"`` or ``"gpu"``; see
  `pallas_kernels.dispatch`);
  None chooses per platform at lowering time (TPU and GPU kernels, XLA elsewhere).
  Under an active mesh the call runs inside ``shard_map`` with batch split over
  ``batch_axes`` and heads over ``head_axes``.
  """
  _validate(q, k, v, segment_ids, sliding_window, logit_soft_cap, alibi_slopes, implementation)
  interpret_backend = resolve_interpret_backend(interpret_backend)
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  params = MaskParams(
      q_offset=s - t, kv_len=s, causal=causal, sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap, scale=d**-0.5 if scale is None else float(scale),
      has_segments=segment_ids is not None, has_alibi=alibi_slopes is not None,
  )
  slopes = None if alibi_slopes is None else jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))
  q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids

  def kernel(backend: str, interpret: bool):
    config = _Kernel(backend, params, block_sizes, interpret)
    return lambda *args: _pallas_attention(*args, config)

  run = choose(implementation, kernel, lambda *a: xla.attention_xla(*a, params, block_sizes.xla_block_k),
               interpret_backend)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k, v, q_seg, kv_seg, slopes)
  heads = P(batch_axes, None, head_axes, None)
  rows = P(batch_axes, None)
  seg_specs = (None, None) if segment_ids is None else (rows, rows)
  slope_spec = None if slopes is None else P(head_axes)
  return jax.shard_map(run, in_specs=(heads, heads, heads, *seg_specs, slope_spec), out_specs=heads,
                       check_vma=False)(q, k, v, q_seg, kv_seg, slopes)


def attention_to_first_key(
    q: Float[Array, "b t hq d"],
    k: Float[Array, "b s hkv d"],
    *,
    causal: bool = False,
    segment_ids: tuple[Int[Array, "b t"], Int[Array, "b s"]] | None = None,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Float[Array, "hq"] | None = None,
) -> Float[Array, "b t hq"]:
  """The attention weight each query puts on key 0 (the attention-sink measure of Xiao
  et al. 2024 and Qiu et al. 2025), under the same mask semantics as `flash_attention`,
  in linear memory: exp(score(q, k_0) - logsumexp over visible keys), 0 if k_0 is hidden."""
  _validate(q, k, k, segment_ids, sliding_window, logit_soft_cap, alibi_slopes, "xla")
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  params = MaskParams(
      q_offset=s - t, kv_len=s, causal=causal, sliding_window=sliding_window,
      logit_soft_cap=logit_soft_cap, scale=d**-0.5 if scale is None else float(scale),
      has_segments=segment_ids is not None, has_alibi=alibi_slopes is not None,
  )
  q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
  slopes = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32)
  zeros = jnp.zeros((b, s, hkv, 1), q.dtype)
  _, lse = xla._forward(q, k, zeros, q_seg, kv_seg, slopes, params, xla.DEFAULT_BLOCK_K)
  q5 = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4).astype(jnp.float32)
  k0 = k[:, :1].transpose(0, 2, 1, 3).astype(jnp.float32)  # [b, hkv, 1, d]
  q_seg5 = None if q_seg is None else q_seg.reshape(b, 1, 1, t, 1)
  k0_seg = None if kv_seg is None else kv_seg[:, :1].reshape(b, 1, 1, 1, 1)
  s0, visible0 = xla._tile(q5, k0, q_seg5, k0_seg, xla._slopes(slopes, q5), 0, 1, params)
  weight = jnp.where(visible0, jnp.exp(s0 - lse), 0.0)  # [b, hkv, g, t, 1]
  return weight[..., 0].transpose(0, 3, 1, 2).reshape(b, t, hq)
