"""The Mosaic TPU path: jax's megablox kernels (``gmm`` and ``tgmm``; tiles may straddle
two groups, the group metadata is computed once and scalar-prefetched), wrapped for
``ragged_dot`` semantics. megablox needs m to be a multiple of the row tile (rows are
padded here), and leaves output rows past ``sum(group_sizes)`` uninitialized, so they
are selected away with ``where`` (a product with zero would keep a NaN)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# `megablox/__init__.py` rebinds the name `gmm` to the custom_vjp op; the kernels live in the module.
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

ROW_TILE = 512  # MaxText's default megablox tiles for model widths: 512 x 1024 x 1024


def _column_tile(dim: int, largest: int = 1024) -> int:
  """The largest of ``largest``, 512, 256, 128 dividing ``dim`` (Mosaic blocks span
  multiples of 128 lanes), else the whole dimension."""
  for tile in (largest, 512, 256, 128):
    if tile <= dim and dim % tile == 0:
      return tile
  return dim


def _row_tile(m: int) -> int:
  return min(ROW_TILE, -(-m // 16) * 16)  # 16 rows: a bf16 sublane tile


def _tiles(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  """(tm, tk, tn): fp32 halves the k tile so the double-buffered blocks and the
  accumulator stay within v5e's 16 MiB of scoped VMEM (12 MiB at 512 x 512 x 1024)."""
  return _row_tile(m), _column_tile(k, 1024 if jnp.dtype(dtype).itemsize < 4 else 512), _column_tile(n)


def _pad_rows(x: jax.Array, tm: int) -> jax.Array:
  return jnp.pad(x, ((0, -x.shape[0] % tm), (0, 0)))


def _grouped_rows(m: int, group_sizes: jax.Array) -> jax.Array:
  return (jnp.arange(m) < jnp.sum(group_sizes))[:, None]


def gmm(
    lhs: Float[Array, "m k"], rhs: Float[Array, "g k n"] | Float[Array, "g n k"], group_sizes: Int[Array, "g"],
    transpose_rhs: bool, out_dtype, interpret: bool,
) -> Float[Array, "m n"]:
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = _row_tile(m)
  out = megablox.gmm(
      _pad_rows(lhs, tm), rhs, group_sizes.astype(jnp.int32), jnp.dtype(out_dtype),
      _tiles(m, k, n, lhs.dtype), transpose_rhs=transpose_rhs, interpret=interpret)
  return jnp.where(_grouped_rows(m, group_sizes), out[:m], 0).astype(out_dtype)


def tgmm(
    lhs: Float[Array, "m k"], grad: Float[Array, "m n"], group_sizes: Int[Array, "g"], out_dtype,
    interpret: bool,
) -> Float[Array, "g k n"]:
  m, k = lhs.shape
  tm = _row_tile(m)
  return megablox.tgmm(
      _pad_rows(lhs, tm).T, _pad_rows(grad, tm), group_sizes.astype(jnp.int32), jnp.dtype(out_dtype),
      _tiles(m, k, grad.shape[1], lhs.dtype), interpret=interpret)
