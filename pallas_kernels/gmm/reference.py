"""The specification: one masked dense product per group, in fp32.

Rows ``[o_i, o_i + s_i)`` of ``lhs`` belong to group i (``o_i = s_0 + ... + s_{i-1}``);
``gmm`` multiplies them by ``rhs[i]``, ``tgmm`` forms ``lhs_iᵀ grad_i``. Rows at or past
``sum(s)`` belong to no group: their output is zero and they contribute nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _group_rows(group_sizes: Int[Array, "g"], m: int, i: int):
  """[m, 1] mask of the rows of group i."""
  end = jnp.sum(group_sizes[: i + 1])
  start = end - group_sizes[i]
  rows = jnp.arange(m)[:, None]
  return (rows >= start) & (rows < end)


def gmm_reference(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "g k n"] | Float[Array, "g n k"],
    group_sizes: Int[Array, "g"],
    transpose_rhs: bool = False,
    preferred_element_type=None,
) -> Float[Array, "m n"]:
  """out[r] = lhs[r] @ rhs[i] for each row r of group i (``rhs[i]ᵀ`` with transpose_rhs)."""
  m = lhs.shape[0]
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  out = 0.0
  for i in range(rhs.shape[0]):
    rows = _group_rows(group_sizes, m, i)
    w = rhs[i].T if transpose_rhs else rhs[i]
    x = jnp.where(rows, lhs, 0).astype(jnp.float32)
    out = out + jnp.where(rows, x @ w.astype(jnp.float32), 0.0)
  return jnp.broadcast_to(out, (m, rhs.shape[1] if transpose_rhs else rhs.shape[2])).astype(out_dtype)


def tgmm_reference(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, "g"],
    preferred_element_type=None,
) -> Float[Array, "g k n"]:
  """out[i] = lhs_iᵀ grad_i over the rows of group i: the gradient of gmm in ``rhs``."""
  m = lhs.shape[0]
  out_dtype = preferred_element_type or jnp.result_type(lhs, grad)
  per_group = []
  for i in range(group_sizes.shape[0]):
    rows = _group_rows(group_sizes, m, i)
    x = jnp.where(rows, lhs, 0).astype(jnp.float32)
    dy = jnp.where(rows, grad, 0).astype(jnp.float32)
    per_group.append(x.T @ dy)
  return jnp.stack(per_group).astype(out_dtype)
