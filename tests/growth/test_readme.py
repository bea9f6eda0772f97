"""Read-ME: channel importance (activation and Taylor), the masks and their split into a
shared and domain experts, carved experts that compute the masked dense MLP, the router's
targets and loss against their formulas, and the pre-gating router's decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.growth import readme
from jaxlab.nn import ModelConfig, Transformer

DENSE = ModelConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2, mlp_dim=24, init_std=0.2, moe_pregate_dim=8,
                    moe_pregate_heads=2)


def model(seed=0, config=DENSE):
  return Transformer(config, rngs=nnx.Rngs(seed))


def tokens(seed, b=2, t=9):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, DENSE.vocab_size)


def hand_down_input(m, x_tokens):
  """Layer 0's down-projection input, the MLP written out: silu(u Wg) * (u Wu)."""
  x, positions, _ = m.embeddings(x_tokens)
  block = m.blocks[0]
  u = block.ffn_norm(x + block.mixer(block.mixer_norm(x), positions))
  return jax.nn.silu(u @ block.ffn.gate.kernel[...]) * (u @ block.ffn.up.kernel[...])


def test_activation_importance_is_the_mean_absolute_down_input():
  m, x = model(1), tokens(2)
  batch = {"inputs": x, "targets": x, "weights": jnp.ones(x.shape)}
  importance = readme.channel_importance(m, [batch, batch])
  assert importance.shape == (2, DENSE.mlp_dim)
  np.testing.assert_allclose(importance[0], jnp.mean(jnp.abs(hand_down_input(m, x)), axis=(0, 1)), rtol=1e-5)


def test_taylor_importance_is_the_loss_change_of_shrinking_a_channel():
  """One token: |h ∂L/∂h| = lim |L(h) - L(h with channel j scaled by 1 - ε)| / ε."""
  m = model(3)
  x = tokens(4, b=1, t=1)
  batch = {"inputs": x, "targets": jnp.asarray([[7]]), "weights": jnp.ones((1, 1))}
  importance = np.asarray(readme.channel_importance(m, [batch], criterion="taylor")[1])
  loss = nnx.jit(lambda model: -jax.nn.log_softmax(model(x)[0, 0])[7])
  base, eps = float(loss(m)), 1e-2
  kernel = m.blocks[1].ffn.down.kernel[...]
  changes = []
  for j in range(DENSE.mlp_dim):
    m.blocks[1].ffn.down.kernel[...] = kernel.at[j].multiply(1 - eps)
    changes.append(abs(float(loss(m)) - base) / eps)
  np.testing.assert_allclose(importance, changes, rtol=0.03, atol=1e-3)


def test_masks_keep_the_channels_above_the_nth_and_split_into_shared_and_experts():
  importance = jnp.asarray([[[6., 5., 4., 3., 2., 1.]], [[1., 5., 6., 2., 4., 3.]]])  # 2 domains, 1 layer
  masks = readme.domain_masks(importance, keep=0.5)  # above the 3rd largest: the top 2
  np.testing.assert_array_equal(masks[:, 0], [[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]])
  carving = readme.Carving.from_masks(masks)
  np.testing.assert_array_equal(carving.shared[0], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(carving.experts[0], [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
  assert int(carving.domain_width[0]) == 2


def random_carving(seed, domains=3):
  importance = jax.random.uniform(jax.random.key(seed), (domains, DENSE.num_layers, DENSE.mlp_dim))
  importance = importance.at[:, :, :6].add(1.0)  # channels every domain needs: a shared expert
  return readme.Carving.from_masks(readme.domain_masks(importance, keep=0.5))


def test_carved_experts_compute_the_masked_dense_mlp():
  dense = model(5)
  carving = random_carving(6)
  _, params, _ = nnx.split(dense, nnx.Param, ...)
  carved_params, config = readme.carve(params, DENSE, carving, seed=1)
  assert config.moe_num_experts == 3 and config.moe_router == "pregate"
  graphdef, _, model_state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  carved = nnx.merge(graphdef, carved_params, model_state)
  x = tokens(7)
  forward = nnx.jit(lambda model, experts: model(x, experts=experts))
  for d in range(3):
    masked = model(5)
    for layer in range(DENSE.num_layers):
      keep = carving.shared[layer] | carving.experts[layer, d]  # = m_d
      down = masked.blocks[layer].ffn.down
      down.kernel[...] = down.kernel[...] * jnp.asarray(keep, jnp.float32)[:, None]
    np.testing.assert_allclose(forward(carved, jnp.full(x.shape, d)), forward(masked, None), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(carved.pregate.embed.table[...], dense.embed.table[...][:, :config.moe_pregate_dim])
  assert carved(x).shape == (2, 9, DENSE.vocab_size)  # the pre-gating router picks when no experts are given


def test_router_targets_and_loss_are_the_formulas():
  carving = readme.Carving(shared=np.zeros((1, 10), bool),
                           experts=np.asarray([[[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]]], bool),
                           domain_width=np.asarray([5]))
  h = jax.random.normal(jax.random.key(8), (1, 3, 10))
  scores = readme.router_targets([h], carving)
  a = np.abs(np.asarray(h, np.float64))
  for t in range(3):
    desc = np.sort(a[0, t])[::-1]
    f = sum((a[0, t] > desc[c]).astype(float) for c in (4, 4, 3, 2, 1)) / 15  # N = 5: ranks N-1, 4N/5, ...
    s = carving.experts[0].astype(float) @ f
    np.testing.assert_allclose(scores[0, 0, t], 10 * (s - s.mean()), rtol=1e-5)
  logits = jax.random.normal(jax.random.key(9), (1, 3, 2))
  weights = jnp.asarray([[1.0, 1.0, 0.0]])
  lp = np.asarray(jax.nn.log_softmax(logits), np.float64)[0]
  sc = np.asarray(scores, np.float64)[0, 0]
  hard = np.full((3, 2), 0.25) + 0.5 * np.eye(2)[sc.argmax(-1)]
  soft = np.exp(sc) / np.exp(sc).sum(-1, keepdims=True)
  per_token = -(0.75 * hard + 0.25 * soft) * lp
  np.testing.assert_allclose(readme.router_loss(logits, scores, weights), per_token.sum(-1)[:2].mean(), rtol=1e-5)


def test_the_pre_gating_router_decodes_as_it_reads_whole_sequences():
  config = dataclasses.replace(DENSE, ffns=("mlp", "moe"), moe_num_experts=3, moe_top_k=1, moe_router="pregate",
                               moe_shared_dim=8)
  m = model(10, config)
  x = tokens(11, t=6)
  decode = nnx.jit(lambda model, token, cache: model.decode(token, cache))
  cache = m.init_cache(2, 6)
  steps = []
  for i in range(6):
    logits, cache = decode(m, x[:, i:i + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), nnx.jit(lambda model: model(x))(m), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_top_k=2), "moe_top_k=1"),
    (dict(moe_pregate_dim=9), "moe_pregate_dim=9 is not divisible"),
])
def test_bad_pregate_config_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(DENSE, **{**dict(ffns=("moe",), moe_num_experts=3, moe_top_k=1, moe_router="pregate"),
                                  **overrides})
