"""Dense-to-sparse gates: routers that start dense (every expert weighted) and end
sparse (hard top-k), driven by a temperature annealed over training steps.

- ``gumbel``: EvoMoE's gate (Nie et al. 2021, ``topkgate.py`` of their fairseq code):
  ``g = softmax((log softmax(ℓ) + G) / τ)`` with Gumbel noise G in training (none
  outside training), gates at or under a threshold masked (their ``GUMBEL_THRESHOLD``
  0.02), and from the switch step on only the top k gates kept, each with its soft value
  (not renormalized, so the router keeps a gradient at k = 1).
- ``activation``: the activation dense-to-sparse gate of Nguyen et al. 2024 ("Is
  Temperature Sample Efficient for Softmax Gaussian Mixture of Experts?"): the router's
  linear output passes through an activation σ before the temperature softmax,
  ``g = softmax(σ(ℓ) / τ)``; ``identity`` is the plain temperature gate they improve on.

The temperature falls from ``moe_dts_max_temperature`` to ``moe_dts_min_temperature``
over ``moe_dts_decay_steps`` (linearly, EvoMoE's ``Linear`` decay, or on a half cosine),
then stays at the minimum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxlab.nn.config import ModelConfig

ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def temperature(config: ModelConfig, step: jax.Array) -> jax.Array:
  """τ(step): from the maximum to the minimum over the decay steps, then the minimum."""
  high, low = config.moe_dts_max_temperature, config.moe_dts_min_temperature
  progress = jnp.clip(step.astype(jnp.float32) / config.moe_dts_decay_steps, 0.0, 1.0)
  if config.moe_dts_schedule == "cosine":
    progress = 0.5 * (1.0 - jnp.cos(math.pi * progress))
  return high + (low - high) * progress


def gate_probabilities(
    config: ModelConfig, logits: Float[Array, "b t e"], tau: jax.Array, noise_key: jax.Array | None,
) -> Float[Array, "b t e"]:
  """The soft gate g over all experts at temperature ``tau`` (before the threshold)."""
  if config.moe_dts_gate == "gumbel":
    scores = jax.nn.log_softmax(logits, axis=-1)
    if noise_key is not None:
      scores = scores + jax.random.gumbel(noise_key, scores.shape, jnp.float32)
  else:
    scores = ACTIVATIONS[config.moe_dts_activation](logits)
  return jax.nn.softmax(scores / tau, axis=-1)


def thresholded(config: ModelConfig, gates: Float[Array, "b t e"]) -> Float[Array, "b t e"]:
  """Gates at or under ``moe_dts_threshold`` set to zero: those experts add nothing."""
  return jnp.where(gates > config.moe_dts_threshold, gates, 0.0)
