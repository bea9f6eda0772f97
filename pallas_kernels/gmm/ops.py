"""Public entry points: `gmm` and `tgmm`, with implementation dispatch and a custom VJP
whose backward is again a grouped product (``dlhs = gmm(dout, rhsᵀ)``, ``drhs = tgmm``)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.dispatch import choose, resolve_interpret_backend
from pallas_kernels.gmm import gpu, tpu, xla
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference

IMPLEMENTATIONS = (None, "reference", "ragged_dot", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class _Products:
  """The grouped products of one implementation (``"xla"``, ``"pallas"``, None or
  ``"pallas_interpret"``), each chosen per platform at lowering by `choose`."""

  implementation: str | None
  interpret_backend: str

  def _choose(self, name: str, xla_fn, static: dict):
    def kernel(backend: str, interpret: bool):
      if backend == "tpu":
        return functools.partial(getattr(tpu, name), **static, interpret=interpret)
      return functools.partial(getattr(gpu, name), **static, launch=gpu.Launch(), interpret=interpret)

    return choose(self.implementation, kernel, functools.partial(xla_fn, **static), self.interpret_backend)

  def gmm(self, lhs, rhs, group_sizes, transpose_rhs: bool, out_dtype):
    static = dict(transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    return self._choose("gmm", xla.gmm, static)(lhs, rhs, group_sizes)

  def tgmm(self, lhs, grad, group_sizes, out_dtype):
    return self._choose("tgmm", xla.tgmm, dict(out_dtype=out_dtype))(lhs, grad, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, transpose_rhs: bool, out_dtype, products: _Products):
  return products.gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype)


def _gmm_forward(lhs, rhs, group_sizes, transpose_rhs, out_dtype, products):
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, products), (lhs, rhs, group_sizes)


def _gmm_backward(transpose_rhs, out_dtype, products, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dlhs = products.gmm(dout, rhs, group_sizes, not transpose_rhs, lhs.dtype)
  if transpose_rhs:  # out = lhs @ rhs[i]ᵀ: drhs[i] = dout_iᵀ lhs_i
    drhs = products.tgmm(dout, lhs, group_sizes, rhs.dtype)
  else:
    drhs = products.tgmm(lhs, dout, group_sizes, rhs.dtype)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_forward, _gmm_backward)


def _check(lhs, rhs, group_sizes, transpose_rhs, implementation):
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm: lhs must be [m, k] and rhs [g, k, n]; got {lhs.shape} and {rhs.shape}")
  k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k:
    side = "[g, n, k] (transpose_rhs=True)" if transpose_rhs else "[g, k, n]"
    raise ValueError(f"gmm: lhs {lhs.shape} has k={lhs.shape[1]} but rhs {rhs.shape} as {side} has k={k}")
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes must be integers of shape ({rhs.shape[0]},) (one per group of "
                     f"rhs); got {group_sizes.dtype}{list(group_sizes.shape)}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"gmm: implementation={implementation!r}; use one of {IMPLEMENTATIONS}")


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "g k n"] | Float[Array, "g n k"],
    group_sizes: Int[Array, "g"],
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    implementation: str | None = None,
    interpret_backend: str | None = None,
) -> Float[Array, "m n"]:
  """Grouped matmul with `jax.lax.ragged_dot` semantics: ``lhs`` rows are sorted by
  group, the ``group_sizes[i]`` rows of group i are multiplied by ``rhs[i]`` (``[k, n]``;
  ``[n, k]`` used transposed with ``transpose_rhs``), and rows past ``sum(group_sizes)``
  are exactly zero with zero gradient. Output in ``preferred_element_type`` (default:
  the inputs' dtype), accumulated in fp32.

  ``implementation``: ``"reference"`` the specification; ``"ragged_dot"`` XLA's op;
  ``"xla"`` row blocks in a loop (`pallas_kernels.gmm.xla`); ``"pallas"`` megablox on
  TPU and the Triton kernel on GPU; ``"pallas_interpret"`` those in interpret mode;
  None chooses per platform at lowering (TPU and GPU kernels, ``"xla"`` elsewhere).
  """
  _check(lhs, rhs, group_sizes, transpose_rhs, implementation)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if implementation == "reference":
    return gmm_reference(lhs, rhs, group_sizes, transpose_rhs, out_dtype)
  if implementation == "ragged_dot":
    return jax.lax.ragged_dot(lhs, rhs.swapaxes(1, 2) if transpose_rhs else rhs, group_sizes,
                              preferred_element_type=out_dtype)
  products = _Products(implementation, resolve_interpret_backend(interpret_backend))
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, products)


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, "g"],
    *,
    preferred_element_type=None,
    implementation: str | None = None,
    interpret_backend: str | None = None,
) -> Float[Array, "g k n"]:
  """Per-group ``lhs_iᵀ grad_i`` over the rows of each group (zero for empty groups):
  the gradient of `gmm` in ``rhs``. Implementations as in `gmm` (``"ragged_dot"``
  is the transposed `jax.lax.ragged_dot_general` there, so it is not offered here)."""
  if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
    raise ValueError(f"tgmm: lhs [m, k] and grad [m, n] must share m; got {lhs.shape} and {grad.shape}")
  if implementation not in IMPLEMENTATIONS or implementation == "ragged_dot":
    raise ValueError(f"tgmm: implementation={implementation!r}; use one of "
                     f"{tuple(i for i in IMPLEMENTATIONS if i != 'ragged_dot')}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, grad))
  if implementation == "reference":
    return tgmm_reference(lhs, grad, group_sizes, out_dtype)
  return _Products(implementation, resolve_interpret_backend(interpret_backend)).tgmm(
      lhs, grad, group_sizes, out_dtype)
