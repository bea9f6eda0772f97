"""The plain-XLA path (the default off TPU and GPU): a loop over fixed-size row blocks.

Each group's rows are cut into blocks of ``block`` rows starting at the group's first
row; block j of group i multiplies ``lhs[o_i + j·block : ...]`` by ``rhs[i]`` and keeps
the rows that belong to group i (a row's product depends on that row only, so the
rows of the next group are simply not selected). There are at most
``(m + g·(block-1)) // block`` blocks, so the work is the dense product's plus at most
one partial block per group, each step one dense matmul. `jax.lax.ragged_dot`'s CPU
lowering instead multiplies the whole ``lhs`` once per group (g times the work).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

BLOCK = 256


def _block_table(group_sizes: Int[Array, "g"], m: int, block: int):
  """Per block (a static upper bound of them): its group, first row and the group's
  end row; and how many blocks are in use."""
  sizes = group_sizes.astype(jnp.int32)
  g = sizes.shape[0]
  ends = jnp.cumsum(sizes)
  counts = (sizes + block - 1) // block
  block_ends = jnp.cumsum(counts)
  v = jnp.arange((m + g * (block - 1)) // block)
  group = jnp.minimum(jnp.searchsorted(block_ends, v, side="right"), g - 1)
  first = ends[group] - sizes[group] + (v - (block_ends[group] - counts[group])) * block
  return group, first, ends[group], block_ends[-1]


def _block_rows(m: int) -> int:
  return max(8, min(BLOCK, -(-m // 8) * 8))


def _pad_rows(x: jax.Array, block: int) -> jax.Array:
  return jnp.pad(x, ((0, block), (0, 0)))


def gmm(
    lhs: Float[Array, "m k"], rhs: Float[Array, "g k n"] | Float[Array, "g n k"], group_sizes: Int[Array, "g"],
    transpose_rhs: bool, out_dtype,
) -> Float[Array, "m n"]:
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block = _block_rows(m)
  group, first, end, count = _block_table(group_sizes, m, block)
  lhs = _pad_rows(lhs, block)
  rows = jnp.arange(block)

  def body(v, out):
    w = jax.lax.dynamic_index_in_dim(rhs, group[v], keepdims=False)
    y = jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, first[v], block), w.T if transpose_rhs else w,
                preferred_element_type=jnp.float32)
    mine = (first[v] + rows < end[v])[:, None]
    y = jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(out, first[v], block))
    return jax.lax.dynamic_update_slice_in_dim(out, y, first[v], 0)

  out = jax.lax.fori_loop(0, count, body, jnp.zeros((m + block, n), jnp.float32))
  return out[:m].astype(out_dtype)


def tgmm(
    lhs: Float[Array, "m k"], grad: Float[Array, "m n"], group_sizes: Int[Array, "g"], out_dtype,
) -> Float[Array, "g k n"]:
  m, g = lhs.shape[0], group_sizes.shape[0]
  block = _block_rows(m)
  group, first, end, count = _block_table(group_sizes, m, block)
  lhs, grad = _pad_rows(lhs, block), _pad_rows(grad, block)
  rows = jnp.arange(block)

  def body(v, out):
    mine = (first[v] + rows < end[v])[:, None]
    x = jnp.where(mine, jax.lax.dynamic_slice_in_dim(lhs, first[v], block), 0)
    dy = jnp.where(mine, jax.lax.dynamic_slice_in_dim(grad, first[v], block), 0)
    w = jax.lax.dynamic_index_in_dim(out, group[v], keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(
        out, w + jnp.dot(x.T, dy, preferred_element_type=jnp.float32), group[v], 0)

  out = jax.lax.fori_loop(0, count, body, jnp.zeros((g, lhs.shape[1], grad.shape[1]), jnp.float32))
  return out.astype(out_dtype)
