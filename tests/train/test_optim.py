"""Schedule, clipping and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train.optim import decay_mask, make_optimizer

OPTIM = ConfigDict(dict(learning_rate=1e-2, warmup_steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                        eps=1e-8, weight_decay=0.5, clip_norm=1.0))


def test_warmup_then_cosine_to_the_floor():
  _, schedule = make_optimizer(OPTIM, total_steps=110)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 1e-3 + 0.5 * 9e-3, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(schedule(110), 1e-3, rtol=1e-6)
  assert all(schedule(s) >= schedule(s + 1) for s in range(10, 110))


def test_warmup_longer_than_training_is_an_error():
  with pytest.raises(ValueError, match="optim.warmup_steps=10"):
    make_optimizer(OPTIM, total_steps=10)


def test_no_decay_on_norms_and_biases():
  model = Transformer(ModelConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, mlp_dim=8,
                                  norm="layernorm", mlp_bias=True), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for key, decayed in flat.items():
    assert decayed == ("kernel" in key or "table" in key), key
  # With zero gradients only weight decay moves parameters: matrices shrink, the rest stay.
  tx, _ = make_optimizer(OPTIM, total_steps=100)
  opt_state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(12):
    updates, opt_state = tx.update(zeros, opt_state, params)
  new = optax.apply_updates(params, updates)
  for (path, old), new_leaf in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new)):
    key = jax.tree_util.keystr(path)
    if flat[key]:
      assert float(jnp.abs(new_leaf).sum()) < float(jnp.abs(old).sum()), key
    else:
      np.testing.assert_array_equal(new_leaf, old)


def test_gradient_spikes_are_clipped():
  """A spike enters Adam's moments only up to the clip norm, so the next update
  after a spike differs between clip_norm=1 and no clipping."""
  params = {"w": jnp.ones((3, 3))}
  grad = {"w": jnp.full((3, 3), 0.1)}
  spike = {"w": jnp.full((3, 3), 1e3)}

  def second_update(clip_norm):
    tx, _ = make_optimizer(ConfigDict({**OPTIM.to_dict(), "clip_norm": clip_norm}), total_steps=100)
    state = tx.init(params)
    _, state = tx.update(spike, state, params)
    updates, _ = tx.update(grad, state, params)
    return updates["w"]

  clipped, unclipped = second_update(1.0), second_update(1e9)
  assert float(jnp.abs(clipped - unclipped).max()) > 1e-4


def test_a_run_that_trains_some_parameters_builds_and_freezes_the_rest(tiny_config):
  """optim.trainable leaves optax MaskedNodes in the frozen parameters' slots; building the
  run (sharding checks included) and a step must accept them and change only the matches."""
  from jaxlab.train.build import build_run
  from jaxlab.train.state import create_train_state

  tiny_config.optim.trainable = "ffn"
  setup = build_run(tiny_config)
  state = create_train_state(setup.model_config, setup.tx, 0, setup.shardings)
  tokens = jnp.zeros((tiny_config.data.batch_size, tiny_config.data.seq_len), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens + 1, "weights": jnp.ones(tokens.shape)}
  new = jax.tree.map(jnp.copy, state)
  for _ in range(2):  # the first step's learning rate is 0 (warmup)
    new, _ = setup.train_step(new, batch)
  blocks, before = new.params["blocks"][0], state.params["blocks"][0]
  assert not np.allclose(blocks["ffn"]["up"]["kernel"][...], before["ffn"]["up"]["kernel"][...])
  np.testing.assert_array_equal(blocks["mixer"]["q"]["kernel"][...], before["mixer"]["q"]["kernel"][...])
