"""Ways to make a train step non-finite, as corrupt data or an unstable model would."""

import jax.numpy as jnp
import pytest

from jaxlab.train import step as step_lib


@pytest.fixture
def nan_gradient_on_doubled_weights(monkeypatch):
  """Patches the train loss with a term that is exactly 0 but has a NaN gradient on
  batches whose weights reach 2. Doubling every weight leaves the weighted mean loss as
  it was, so such a batch has a finite loss and a NaN gradient."""
  original = step_lib.weighted_cross_entropy

  def loss(logits, batch):
    total, correct, weight = original(logits, batch)
    clean = (jnp.max(batch["weights"]) < 1.5).astype(jnp.float32)
    zero = jnp.sum(logits.astype(jnp.float32) * 0.0)  # d sqrt(u)/du = inf at u = 0; inf x 0 = NaN
    return total + jnp.sqrt(zero + clean) - jnp.sqrt(clean), correct, weight

  monkeypatch.setattr(step_lib, "weighted_cross_entropy", loss)
