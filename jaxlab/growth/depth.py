"""Depth maps: which small layer each layer of the grown model starts from."""

from __future__ import annotations

import math

from jaxlab.nn import ModelConfig

# The depth map of each operator (LiGO's depth coefficients start near ``stack``).
DEPTH = {"stack": "stack", "interleave": "interleave", "identity": "identity", "net2net": "identity",
         "bert2bert": "stack", "aki": "stack", "ligo": "stack"}


def block_type(config: ModelConfig, layer: int) -> tuple[str, str]:
  return config.mixer_of(layer), config.ffn_of(layer)


def layer_sources(config: ModelConfig, target: ModelConfig, depth: str) -> list[tuple[int, bool]]:
  """For each large layer: the small layer it starts from and whether it starts as an
  identity map (its output zeroed)."""
  small, large = config.num_layers, target.num_layers
  if large < small:
    raise ValueError(f"growth cannot remove layers: model.num_layers {small} -> {large}")
  if depth == "stack":
    sources = [(i % small, False) for i in range(large)]
  else:
    # Whole periods of a hybrid pattern (mixers, ffns) are repeated in place.
    period = math.lcm(len(target.mixers), len(target.ffns))
    if small % period or large % period:
      period = 1
    repeated = [(i // period) * (small // period) // (large // period) * period + i % period for i in range(large)]
    sources = [(s, depth == "identity" and i >= period and repeated[i - period] == s)
               for i, s in enumerate(repeated)]
  for i, (s, _) in enumerate(sources):
    if block_type(config, s) != block_type(target, i):
      raise ValueError(f"{depth} growth makes large layer {i} from small layer {s}, but their blocks differ: "
                       f"{block_type(target, i)} vs {block_type(config, s)} (model.mixers, model.ffns); "
                       f"choose patterns whose period divides the small model's depth.")
  return sources


def donor_layer(config: ModelConfig, layer: int) -> int:
  """AKI's source of new units: the next small layer of the same kind, else the layer."""
  above = [l for l in range(layer + 1, config.num_layers) if block_type(config, l) == block_type(config, layer)]
  return above[0] if above else layer
