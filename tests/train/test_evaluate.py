"""Sequence metrics: exact match and answer-token accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.data import Addition
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train.evaluate import sequence_metrics
from jaxlab.train.state import TrainState


def test_metrics_match_a_direct_computation():
  config = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest, opt_state=(),
                     rng=jax.random.PRNGKey(0))
  source = Addition(min_digits=1, max_digits=2, num_examples=37, seed=0)
  metrics = sequence_metrics(graphdef, state, source, batch_size=10)
  records = [source[i] for i in range(37)]
  x = np.stack([r["inputs"] for r in records])
  hit = np.asarray(jnp.argmax(model(jnp.asarray(x)), -1)) == np.stack([r["targets"] for r in records])
  w = np.stack([r["weights"] for r in records]) > 0
  assert metrics["token_accuracy"] == hit[w].mean()
  assert metrics["exact_match"] == np.all(hit | ~w, axis=1).mean()
