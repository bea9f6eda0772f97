"""Task metrics on a trained state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sequence_metrics(graphdef: nnx.GraphDef, state: Any, source, batch_size: int = 256) -> dict[str, float]:
  """Over the records of ``source``: ``exact_match``, the fraction whose every weighted
  target is the model's argmax (under teacher forcing this is exactly the fraction
  that greedy decoding gets right), and ``token_accuracy``, the fraction of weighted
  targets that are."""
  model = nnx.merge(graphdef, state.params, state.model_state)
  forward = jax.jit(lambda m, x: m(x))
  exact, correct, total = [], 0.0, 0.0
  for start in range(0, len(source), batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    batch = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in ("inputs", "targets", "weights")}
    hit = jnp.argmax(forward(model, batch["inputs"]), -1) == batch["targets"]
    weighted = batch["weights"] > 0
    exact.append(np.asarray(jnp.all(hit | ~weighted, axis=-1)))
    correct += float(jnp.sum(hit & weighted))
    total += float(jnp.sum(weighted))
  return {"exact_match": float(np.concatenate(exact).mean()), "token_accuracy": correct / max(total, 1.0)}
