"""Low-rank adaptation (LoRA; Hu et al. 2021): ``h = x W + (alpha / r) x A B`` on the
dense layers whose path matches ``model.lora_targets``.

A [in..., r] starts as Kaiming-uniform (bound 1 / sqrt(fan_in), as PEFT initializes it)
and B [r, out...] as zeros, so an adapted model computes exactly what its base does until
B is trained (the paper's Sec. 4.1). ``merge_lora`` folds ``(alpha / r) A B`` into W for
export or for any code that reads kernels directly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.nn.linear import Linear, logical_param

LORA_PARAMETERS = r"/lora/(a|b)$"  # the adapter's parameter paths, the default ``optim.trainable``


class LoRA(nnx.Module):
  """The update ``(alpha / rank) · x A B`` for a ``Linear`` of these features and axis names."""

  def __init__(self, linear: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    in_shape = linear.kernel.shape[:linear.num_in]
    out_shape = linear.kernel.shape[linear.num_in:]
    names = linear.kernel.get_metadata("out_sharding")
    in_names, out_names = names[:linear.num_in], names[linear.num_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    self.num_in = linear.num_in
    self.scale = alpha / rank
    self.a = logical_param(jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound),
                           (*in_names, None))
    self.b = logical_param(jnp.zeros((rank, *out_shape), jnp.float32), (None, *out_names))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., *in] -> [..., *out], as the adapted ``Linear``."""
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    low = jax.lax.dot_general(x, self.a[...].astype(x.dtype), (contract, ((), ())))
    up = jax.lax.dot_general(low, self.b[...].astype(x.dtype), (((low.ndim - 1,), (0,)), ((), ())))
    return up * jnp.asarray(self.scale, x.dtype)

  def delta(self) -> jax.Array:
    return kernel_update(self.a[...], self.b[...], self.scale)


def kernel_update(a: Float[Array, "*in r"], b: Float[Array, "r ..."], scale: float) -> jax.Array:
  """``scale · A B`` (scale = alpha / rank) in the kernel's shape [*in, *out], fp32."""
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merged_by_name(params: dict[str, jax.Array], config: Any) -> dict[str, jax.Array]:
  """``merge_lora`` on parameters by path name ('blocks/0/mixer/q/kernel'): adapted
  kernels become W + (alpha / r) A B, and the adapters are dropped."""
  merged = {n: v for n, v in params.items() if "/lora/" not in n}
  for name in params:
    if name.endswith("/lora/a"):
      prefix = name.removesuffix("/lora/a")
      kernel = params[f"{prefix}/kernel"]
      update = kernel_update(params[name], params[f"{prefix}/lora/b"], config.lora_alpha / config.lora_rank)
      merged[f"{prefix}/kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
  return merged


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def target_linears(model: nnx.Module, pattern: str) -> list[tuple[str, Linear]]:
  """The ``Linear`` layers whose path (e.g. 'blocks/3/mixer/q') matches ``pattern``."""
  regex = re.compile(pattern)
  linears = [(_path(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, Linear)]
  chosen = [(p, m) for p, m in linears if regex.search(p)]
  if not chosen:
    raise ValueError(f"model.lora_targets={pattern!r} matches no dense layer; their paths look like "
                     f"{[p for p, _ in linears[:6]]}.")
  return chosen


def add_lora(model: nnx.Module, config: Any, *, rngs: nnx.Rngs) -> None:
  """Gives each targeted ``Linear`` of ``model`` an adapter of ``config.lora_rank``."""
  for _, linear in target_linears(model, config.lora_targets):
    linear.lora = LoRA(linear, config.lora_rank, config.lora_alpha, rngs=rngs)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of a LoRA model with ``W + (alpha / r) A B`` as each adapted kernel and no
  adapters, its config's ``lora_rank`` set to 0: the model to export or to grow."""
  merged = nnx.clone(model)
  adapted = [m for _, m in nnx.iter_graph(merged) if isinstance(m, Linear) and m.lora is not None]
  for linear in adapted:
    kernel = linear.kernel[...]
    linear.kernel[...] = (kernel.astype(jnp.float32) + linear.lora.delta()).astype(kernel.dtype)
    linear.lora = None
  merged.config = dataclasses.replace(merged.config, lora_rank=0)
  return merged
