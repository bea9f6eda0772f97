"""Recency (influence) and over-smoothing diagnostics on any model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.diagnostics import influence, influence_by_distance, mean_pairwise_cosine, oversmoothing

BASE = dict(vocab_size=41, d_model=16, num_heads=2, mlp_dim=32, ssm_state=4, ssm_chunk=16)


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, 41, jnp.int32)


def test_influence_follows_the_receptive_field_of_sliding_windows():
  """Two layers of window-3 attention: position t reads exactly positions t-4..t."""
  model = Transformer(ModelConfig(**BASE, num_layers=2, sliding_window=3), rngs=nnx.Rngs(0))
  scores = np.asarray(influence(model, tokens((2, 12)), target=9))
  assert np.all(scores[:, 5:10] > 1e-6)
  np.testing.assert_array_equal(scores[:, :5], 0.0)
  np.testing.assert_array_equal(scores[:, 10:], 0.0)


def test_influence_of_a_recurrent_model_is_causal_and_reaches_the_start():
  model = Transformer(ModelConfig(**BASE, num_layers=1, mixers=("mamba",)), rngs=nnx.Rngs(0))
  scores = np.asarray(influence(model, tokens((1, 10)), target=6))
  np.testing.assert_array_equal(scores[:, 7:], 0.0)
  assert np.all(scores[:, :7] > 0.0)


def test_influence_by_distance_lines_up_targets():
  model = Transformer(ModelConfig(**BASE, num_layers=1, sliding_window=2), rngs=nnx.Rngs(1))
  curve = np.asarray(influence_by_distance(model, tokens((2, 9)), targets=(8, 5)))
  assert curve.shape == (6,)
  assert curve[0] > 0 and curve[1] > 0
  np.testing.assert_array_equal(curve[2:], 0.0)  # a window of 2 sees distances 0 and 1


def test_mean_pairwise_cosine():
  same = jnp.ones((2, 5, 3))
  chex.assert_trees_all_close(mean_pairwise_cosine(same), 1.0, atol=1e-6)
  chex.assert_trees_all_close(mean_pairwise_cosine(jnp.eye(4)[None]), 0.0, atol=1e-6)
  sixty = jnp.array([[[1.0, 0.0], [0.5, 0.75**0.5]]])
  chex.assert_trees_all_close(mean_pairwise_cosine(sixty), 0.5, atol=1e-6)


def test_oversmoothing_has_one_value_per_layer_and_starts_at_the_embeddings():
  model = Transformer(ModelConfig(**BASE, num_layers=3, mixers=("mamba", "attention")), rngs=nnx.Rngs(2))
  t = tokens((2, 8))
  values = oversmoothing(model, t)
  assert values.shape == (4,)
  chex.assert_trees_all_close(values[0], mean_pairwise_cosine(model.embed(t)), atol=1e-6)
  assert np.all(np.abs(np.asarray(values)) <= 1.0 + 1e-6)
