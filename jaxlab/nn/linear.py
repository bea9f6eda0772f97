"""Parameters with logical axis names, and a dense layer over multi-axis features."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.nn.reports import report_input_gram


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
  """An ``nnx.Param`` annotated with logical axis names (see jaxlab/sharding/rules.py).

  Eager sharding is off: the train state is created under ``jax.jit`` with explicit
  output shardings resolved from these names, so no full copy is ever built on a host.
  """
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} logical names {tuple(names)} for a {value.ndim}-d parameter")
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def broadcast_leading(w: jax.Array, ndim: int) -> jax.Array:
  """Prepends unit axes so ``w`` broadcasts over the leading axes of an ``ndim`` array."""
  return w.reshape((1,) * (ndim - w.ndim) + w.shape)


class Linear(nnx.Module):
  """y = x · W (+ b), contracting the trailing ``len(in_features)`` axes of x.

  The kernel has shape ``in_features + out_features`` so heads stay a separate axis
  (e.g. ``[embed, heads, head_dim]``), as in MaxText's DenseGeneral.
  """

  def __init__(
      self,
      in_features: Sequence[int],
      out_features: Sequence[int],
      in_names: Sequence[str | None],
      out_names: Sequence[str | None],
      *,
      use_bias: bool = False,
      init_std: float = 0.02,
      rngs: nnx.Rngs,
  ):
    self.num_in = len(in_features)
    shape = (*in_features, *out_features)
    init = jax.random.normal(rngs.params(), shape, jnp.float32) * init_std
    self.kernel = logical_param(init, (*in_names, *out_names))
    self.bias = (
        logical_param(jnp.zeros(tuple(out_features), jnp.float32), out_names) if use_bias else None
    )
    self.lora = nnx.data(None)  # a `jaxlab.nn.lora.LoRA` adapter, set by `add_lora`

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    report_input_gram(self, x, self.num_in)
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    y = jax.lax.dot_general(x, kernel.astype(x.dtype), (contract, ((), ())))
    if self.bias is not None:
      y = y + broadcast_leading(self.bias[...].astype(y.dtype), y.ndim)
    if self.lora is not None:
      y = y + self.lora(x)
    return y
