"""Depth up-scaling (SOLAR, Kim et al. 2023, §2.1): two models of ``n`` layers stacked
into one of ``2(n - m)``: the first ``n - m`` layers of the first model, then the last
``n - m`` of the second (the paper stacks two copies of one model with m = 8 of n = 32).
Embeddings, the final norm and the head come from the first model. Each layer is copied
whole; the blocks of both models must line up with the target's layer pattern.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxlab.growth.depth import block_type
from jaxlab.growth.spaces import LAYER
from jaxlab.growth.trees import abstract_params, by_name, rebuild
from jaxlab.nn import ModelConfig


def stacked_config(config: ModelConfig, drop: int) -> ModelConfig:
  """The depth-up-scaled model: ``2 (num_layers - drop)`` layers, the rest unchanged."""
  n = config.num_layers
  if not 0 <= drop < n:
    raise ValueError(f"drop={drop}: remove between 0 and {n - 1} of the {n} layers at the seam.")
  target = dataclasses.replace(config, num_layers=2 * (n - drop))
  for layer in range(target.num_layers):
    source = layer if layer < n - drop else layer - (n - drop) + drop
    if block_type(target, layer) != block_type(config, source):
      raise ValueError(f"stacking puts layer {source} at layer {layer}, but the target's pattern has "
                       f"{block_type(target, layer)} there (model.mixers {config.mixers}, model.ffns "
                       f"{config.ffns}): choose drop so that the pattern's period divides num_layers - 2 drop.")
  return target


def stack(first: nnx.State, second: nnx.State, config: ModelConfig, drop: int) -> tuple[nnx.State, ModelConfig]:
  """``first``'s layers ``[0, n - drop)`` then ``second``'s ``[drop, n)``, and the target's config."""
  target = stacked_config(config, drop)
  keep = config.num_layers - drop
  a, b = by_name(first), by_name(second)

  def value(name: str, like) -> object:
    layer = LAYER.fullmatch(name)
    if layer is None:
      return a[name]
    i, rest = int(layer.group(1)), layer.group(2)
    return a[f"blocks/{i}/{rest}"] if i < keep else b[f"blocks/{i - keep + drop}/{rest}"]

  return rebuild(abstract_params(target), value), target
