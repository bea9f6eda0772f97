"""Pallas GPU kernels (Triton lowering): ``gmm`` (rows sorted by group, each group's rows
times its own matrix, `jax.lax.ragged_dot` semantics) and ``tgmm`` (per-group lhsᵀ grad,
the gradient of gmm in rhs).

gmm tiles the rows by ``block_m`` as megablox does: a tile that straddles groups is
visited once per group, each visit storing only its group's rows. The visits come from
the traced ``group_sizes`` in plain JAX (at most ``m_tiles + g``: the rows past
``sum(group_sizes)`` are one more group, whose visits store zeros, so every output row
is written) and reach the kernel as small int32 arrays, Pallas GPU having no scalar
prefetch. tgmm gives each (group, k tile, n tile) program its group's row tiles, masked
to the group's rows. Inputs are zero-padded to whole blocks; blocks are powers of two
>= 16 (Triton), shrunk for small dims.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Launch:
  """Tiles and Triton launch settings; a field left None takes its dtype's default
  (`DEFAULTS`). gmm: output tiles [block_m, block_n], k reduced in steps of block_k.
  tgmm: output tiles [block_k, block_n], rows reduced in steps of block_m."""

  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def resolve(self, dtype) -> Launch:
    """Every field set: this launch's, else the default for ``dtype``'s inputs."""
    default = DEFAULTS["fp32" if jnp.dtype(dtype).itemsize >= 4 else "16bit"]
    return Launch(**{f.name: getattr(default, f.name) if getattr(self, f.name) is None
                     else getattr(self, f.name) for f in dataclasses.fields(self)})


# The same on A100 and H100, without register spills for either (ptxas, sm_80 and
# sm_90, at m 4096, k 1024, n 2048, 8 groups). 16-bit: the usual Triton matmul tile,
# 128 x 128 x 64 over 8 warps, 3 stages: 96 KiB of pipelined operands in shared memory
# (the A100 has 163 KiB, the H100 227 KiB). fp32 runs three TF32 products (tf32x3) per
# step; 128-wide tiles spill with them, 64 x 64 x 32 over 4 warps do not (48 KiB).
# Larger row tiles also waste more where tiles straddle groups.
DEFAULTS = {
    "16bit": Launch(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    "fp32": Launch(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3),
}


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def _blocks(launch: Launch, m: int, n: int, k: int) -> tuple[int, int, int]:
  """The blocks used: the launch's, each shrunk to a power of two >= 16 covering its dim."""
  blocks = []
  for field, dim in (("block_m", m), ("block_n", n), ("block_k", k)):
    block = getattr(launch, field)
    if block < 16 or block & (block - 1):
      raise ValueError(f"Launch.{field}={block}: Triton blocks are powers of two >= 16")
    blocks.append(min(block, max(16, _pow2(dim))))
  return tuple(blocks)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _precision(dtype, interpret):
  """fp32 products to about fp32 accuracy: on the GPU as three TF32 tensor-core products
  (Triton's tf32x3; its default for fp32 is one TF32 product, 10-bit mantissas, and full
  fp32 runs on the FMA units and spills at these tiles), interpreted in fp32 (XLA:CPU has
  no TF32 algorithms)."""
  if dtype != jnp.float32:
    return None
  return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last row of each group, clipped to m."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def _visits(group_sizes: jax.Array, m: int, m_pad: int, bm: int):
  """Per visit (``m_pad / bm + g`` of them, static): its group (g: the rows past the
  groups, to be zeroed; g + 1: unused), its row tile and the rows [lo, hi) it stores."""
  g = group_sizes.shape[0]
  starts, ends = _group_bounds(group_sizes, m)
  starts = jnp.append(starts, ends[-1])  # group g: rows past sum(group_sizes), padding too
  ends = jnp.append(ends, m_pad)
  first = starts // bm
  count = jnp.where(ends > starts, (ends - 1) // bm - first + 1, 0)
  done = jnp.cumsum(count)
  n_visits = m_pad // bm + g
  v = jnp.arange(n_visits, dtype=jnp.int32)
  group = jnp.searchsorted(done, v, side="right").astype(jnp.int32)  # g + 1 past the last
  own = jnp.minimum(group, g)
  tile = jnp.clip(first[own] + v - (done[own] - count[own]), 0, m_pad // bm - 1)
  return group, tile.astype(jnp.int32), starts[own], ends[own]


def _gmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, g: int, bm: int,
                bk: int, k_tiles: int, transpose_rhs: bool, precision):
  v = pl.program_id(0)
  group, lo, hi = group_ref[v], lo_ref[v], hi_ref[v]
  start = pl.multiple_of(tile_ref[v] * bm, bm)
  rows = start + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  mask = (rows >= lo) & (rows < hi)
  out = out_ref.at[pl.ds(start, bm), :]
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  @pl.when(group < g)
  def _product():
    def body(i, acc):
      ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
      x = lhs_ref[pl.ds(start, bm), ks]
      w = rhs_ref[group, :, ks] if transpose_rhs else rhs_ref[group, ks, :]
      return acc + jax.lax.dot_general(x, w, contract, precision=precision,
                                       preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_tiles, body, jnp.zeros(out.shape, jnp.float32))
    pltriton.store(out, acc.astype(out.dtype), mask=mask)

  @pl.when(group == g)
  def _past_the_groups():
    pltriton.store(out, jnp.zeros(out.shape, out.dtype), mask=mask)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, bm: int, precision):
  i = pl.program_id(0)
  lo, hi = start_ref[i], end_ref[i]
  first = jax.lax.div(lo, bm)
  last = jnp.where(hi > lo, jax.lax.div(hi + bm - 1, bm), first)

  def body(t, acc):
    start = pl.multiple_of(t * bm, bm)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    mask = (rows >= lo) & (rows < hi)
    x = pltriton.load(lhs_ref.at[pl.ds(start, bm), :], mask=mask, other=0.0)
    y = pltriton.load(grad_ref.at[pl.ds(start, bm), :], mask=mask, other=0.0)
    return acc + jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(first, last, body, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _params(launch: Launch):
  return pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "g k n"] | Float[Array, "g n k"],
    group_sizes: Int[Array, "g"],
    *,
    transpose_rhs: bool = False,
    out_dtype=None,
    launch: Launch = Launch(),
    interpret: bool = False,
) -> Float[Array, "m n"]:
  """Rows [offset_i, offset_i + group_sizes[i]) of lhs times rhs[i] (rhs[i]ᵀ with
  ``transpose_rhs``, rhs then [g, n, k]); rows past sum(group_sizes) are zero. fp32
  accumulation, output in ``out_dtype`` (default: the inputs' dtype)."""
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  dtype = jnp.result_type(lhs, rhs)
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  launch = launch.resolve(dtype)
  bm, bn, bk = _blocks(launch, m, n, k)
  m_pad, n_pad, k_pad = _round_up(max(m, 1), bm), _round_up(n, bn), _round_up(k, bk)
  lhs = _pad_to(lhs.astype(dtype), (m_pad, k_pad))
  rhs = _pad_to(rhs.astype(dtype), (g, n_pad, k_pad) if transpose_rhs else (g, k_pad, n_pad))
  visits = _visits(group_sizes, m, m_pad, bm)
  n_visits = visits[0].shape[0]
  meta = pl.BlockSpec((n_visits,), lambda v, j: (0,))
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((g, bn, k_pad), lambda v, j: (0, j, 0))
  else:
    rhs_spec = pl.BlockSpec((g, k_pad, bn), lambda v, j: (0, 0, j))
  kernel = functools.partial(_gmm_kernel, g=g, bm=bm, bk=bk, k_tiles=k_pad // bk,
                             transpose_rhs=transpose_rhs, precision=_precision(dtype, interpret))
  out = pl.pallas_call(
      kernel, grid=(n_visits, n_pad // bn),
      in_specs=[meta, meta, meta, meta, pl.BlockSpec((m_pad, k_pad), lambda v, j: (0, 0)), rhs_spec],
      out_specs=pl.BlockSpec((m_pad, bn), lambda v, j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      compiler_params=_params(launch), interpret=interpret, name="gmm",
  )(*visits, lhs, rhs)
  return out[:m, :n]


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, "g"],
    *,
    out_dtype=None,
    launch: Launch = Launch(),
    interpret: bool = False,
) -> Float[Array, "g k n"]:
  """Per group i, lhs[rows of i]ᵀ @ grad[rows of i] (zero for an empty group); rows past
  sum(group_sizes) contribute nothing. fp32 accumulation, output in ``out_dtype``."""
  m, k = lhs.shape
  n = grad.shape[1]
  g = group_sizes.shape[0]
  dtype = jnp.result_type(lhs, grad)
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  launch = launch.resolve(dtype)
  bm, bn, bk = _blocks(launch, m, n, k)
  m_pad, n_pad, k_pad = _round_up(max(m, 1), bm), _round_up(n, bn), _round_up(k, bk)
  lhs = _pad_to(lhs.astype(dtype), (m_pad, k_pad))
  grad = _pad_to(grad.astype(dtype), (m_pad, n_pad))
  starts, ends = _group_bounds(group_sizes, m)
  bounds = pl.BlockSpec((g,), lambda i, a, b: (0,))
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, precision=_precision(dtype, interpret)),
      grid=(g, k_pad // bk, n_pad // bn),
      in_specs=[bounds, bounds, pl.BlockSpec((m_pad, bk), lambda i, a, b: (0, a)),
                pl.BlockSpec((m_pad, bn), lambda i, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda i, a, b: (i, a, b)),
      out_shape=jax.ShapeDtypeStruct((g, k_pad, n_pad), out_dtype),
      compiler_params=_params(launch), interpret=interpret, name="tgmm",
  )(starts, ends, lhs, grad)
  return out[:, :k, :n]
