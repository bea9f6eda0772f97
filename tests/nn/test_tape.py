"""TAPE's claims (Zhu et al. 2025): RoPE at initialization, invariance to a global
position offset for any parameters, equivariance of the position update to a rotation
of every token's position features; and TAPE as fine-tuning of a RoPE model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.tape import initial_position_state
from jaxlab.nn.transformer import convert_positional
from jaxlab.train.optim import make_optimizer

CONFIG = dict(vocab_size=41, d_model=32, num_layers=3, num_heads=4, mlp_dim=48, positional="tape")


def tokens(seed, shape=(2, 11)):
  return jax.random.randint(jax.random.key(seed), shape, 0, 41, jnp.int32)


def randomize(model, seed, scale=0.2):
  """Every parameter random (TAPE's zero-initialized maps included)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                                 for k, x in zip(keys, leaves)]))
  return model


def test_tape_equals_rope_at_initialization():
  rope_model = randomize(Transformer(ModelConfig(**{**CONFIG, "positional": "rope"}), rngs=nnx.Rngs(0)), 1)
  tape_model = convert_positional(rope_model, "tape", rngs=nnx.Rngs(2))
  t = tokens(3)
  chex.assert_trees_all_close(tape_model(t), rope_model(t), atol=1e-5)
  # and it is not a no-op: once TAPE's parameters move, the logits do
  moved = randomize(tape_model, 4, scale=0.1)
  assert float(jnp.abs(moved(t) - rope_model(t)).max()) > 1e-3


def test_logits_are_invariant_to_a_global_position_offset_for_any_parameters():
  model = randomize(Transformer(ModelConfig(**CONFIG), rngs=nnx.Rngs(0)), seed=5)
  t = tokens(6)
  base = jnp.broadcast_to(jnp.arange(11), (2, 11))
  reference = model(t, base)
  for offset in (1, 37, 1000):
    chex.assert_trees_all_close(model(t, base + offset), reference, atol=5e-5, rtol=5e-5)
  # A model with learned absolute positions is not invariant: the test can tell.
  learned = randomize(Transformer(ModelConfig(**{**CONFIG, "positional": "learned"}), rngs=nnx.Rngs(0)), 5)
  assert float(jnp.abs(learned(t, base + 37) - learned(t, base)).max()) > 1e-3


def rotate_features(pe, angles):
  """The same rotation by angles[f] of every token's (C_f, S_f) pair, per frequency f
  (features f and f + d/2 share a frequency)."""
  phi = jnp.concatenate([angles, angles]).reshape(1, 1, 1, -1)
  cos, sin = jnp.cos(phi), jnp.sin(phi)
  c, s = pe
  return c * cos - s * sin, c * sin + s * cos


def test_position_update_is_equivariant_to_rotating_the_features():
  model = randomize(Transformer(ModelConfig(**CONFIG), rngs=nnx.Rngs(0)), seed=7)
  block = model.blocks[1]
  x = jax.random.normal(jax.random.key(8), (2, 11, 32))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  pe = initial_position_state(positions, model.config)
  pe = randomize_features(pe)  # a contextual state, not just RoPE's
  angles = jax.random.uniform(jax.random.key(9), (4,), minval=0, maxval=2 * np.pi)
  y, pe_out = block(x, positions, pe)
  y_rot, pe_rot_out = block(x, positions, rotate_features(pe, angles))
  chex.assert_trees_all_close(y_rot, y, atol=1e-4)  # token states do not change
  chex.assert_trees_all_close(pe_rot_out, rotate_features(pe_out, angles), atol=1e-4)


def randomize_features(pe):
  """Contextual features keep TAPE's structure: feature f and f + d/2 are equal."""
  keys = jax.random.split(jax.random.key(10), 2)
  half = pe[0].shape[-1] // 2
  noise = [jnp.tile(jax.random.normal(k, pe[0].shape[:-1] + (half,)), 2) for k in keys]
  return pe[0] + 0.3 * noise[0], pe[1] + 0.3 * noise[1]


def test_tape_fine_tuning_of_a_rope_model_changes_only_tape_parameters():
  """Parameter-efficient fine-tuning (the paper's PEFT setting): a pretrained RoPE model
  becomes TAPE and only TAPE's parameters train."""
  rope_model = randomize(Transformer(ModelConfig(**{**CONFIG, "positional": "rope"}), rngs=nnx.Rngs(0)), 1)
  model = convert_positional(rope_model, "tape", rngs=nnx.Rngs(2))
  optim = ConfigDict(dict(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                          eps=1e-8, weight_decay=0.1, clip_norm=1.0, trainable="tape"))
  tx, _ = make_optimizer(optim, total_steps=10)
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)
  t = tokens(11, (4, 16))

  def loss(params):
    logits = nnx.merge(graphdef, params)(t[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

  start = params
  for _ in range(3):
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(jnp.add, params, updates)
  changed = {"/".join(map(str, path)) for (path, a), (_, b) in zip(
      nnx.to_flat_state(start), nnx.to_flat_state(params)) if not np.array_equal(a[...], b[...])}
  tape_params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)
                 if "tape" in "/".join(map(str, p))}
  assert changed <= tape_params, sorted(changed - tape_params)
  # The last block's position update never reaches the logits, so it gets no gradient.
  assert {n for n in tape_params if not n.startswith("blocks/2/")} <= changed
