"""The MoE layer: routers, the three dispatches against a dense per-expert formula,
capacity drops, the losses and metrics it reports, and its config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.moe import MoE, capacity_of
from jaxlab.nn.reports import capture_reports, flat_reports

BASE = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=4, mlp_dim=48, ffns=("moe",),
                   moe_num_experts=4, moe_top_k=2, moe_expert_dim=40)


def layer(seed=0, **overrides):
  return MoE(dataclasses.replace(BASE, **overrides), layer=0, rngs=nnx.Rngs(seed))


def inputs(seed, b=3, t=13):
  return jax.random.normal(jax.random.key(seed), (b, t, BASE.d_model), jnp.float32)


def expert_ffn(moe, e, x):
  """Expert e on every token, written out: down(silu(x Wg) * (x Wu)) or down(gelu(x Wu))."""
  up = x @ moe.experts.up[...][e]
  h = jax.nn.gelu(up, approximate=True) if moe.experts.gate is None else jax.nn.silu(x @ moe.experts.gate[...][e]) * up
  return h @ moe.experts.down[...][e]


def dense_mixture(moe, x, gates):
  """Σ_e gates[..., e] · FFN_e(x): every expert on every token, weighted."""
  return sum(gates[..., e:e + 1] * expert_ffn(moe, e, x) for e in range(gates.shape[-1]))


def token_choice_gates(moe, x):
  routing = moe.router.route(moe.router.logits(x))
  onehot = jax.nn.one_hot(routing.experts, moe.config.moe_num_experts)
  return jnp.einsum("btk,btke->bte", routing.weights, onehot), routing


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(mlp_activation="gelu", moe_gate_order="topk_softmax"),
    dict(moe_router="sigmoid", moe_top_k=3),
    dict(moe_renormalize=False, moe_top_k=1),
    dict(moe_gmm_impl="pallas_interpret"),
], ids=["softmax_topk", "gelu_topk_softmax", "sigmoid", "switch_top1", "gmm_kernel"])
def test_dropless_equals_the_dense_mixture(overrides):
  moe = layer(1, **overrides)
  x = inputs(2)
  gates, _ = token_choice_gates(moe, x)
  np.testing.assert_allclose(moe(x), dense_mixture(moe, x, gates), atol=2e-5, rtol=1e-4)


def test_capacity_without_drops_equals_dropless():
  x = inputs(3)
  dropless = layer(4)
  capacity = layer(4, moe_dispatch="capacity", moe_capacity_factor=4.0)  # C = t: nothing drops
  assert capacity_of(capacity.config, x.shape[1]) == x.shape[1]
  np.testing.assert_allclose(capacity(x), dropless(x), atol=1e-5, rtol=1e-5)


def test_capacity_keeps_first_choices_before_second_ones_and_counts_drops():
  """Even tokens choose experts (0, 1), odd tokens (1, 0). With C = 2 copies per expert
  and sequence, each expert keeps the first choices of its first two tokens: GShard's
  priority, not the order of the tokens."""
  moe = layer(5, moe_dispatch="capacity", moe_capacity_factor=0.5, moe_top_k=2)
  kernel = np.zeros((BASE.d_model, 4), np.float32)
  kernel[0, 0] = kernel[1, 1] = 3.0
  moe.router.kernel[...] = jnp.asarray(kernel)
  t = 8
  even = (np.arange(t) % 2 == 0)[None, :]
  x = np.asarray(inputs(6, b=2, t=t)).copy()
  x[..., 0], x[..., 1] = np.where(even, 1.0, 0.5), np.where(even, 0.5, 1.0)
  x = jnp.asarray(x)
  c = capacity_of(moe.config, t)  # ceil(0.5 · 2 · 8 / 4) = 2
  gates, routing = token_choice_gates(moe, x)
  np.testing.assert_array_equal(routing.experts[..., 0], np.broadcast_to(np.where(even, 0, 1), (2, t)))
  kept = np.zeros((2, t, 4), np.float32)
  kept[:, [0, 2], 0] = kept[:, [1, 3], 1] = 1.0
  y, _, metrics = capture_reports(moe, x)
  np.testing.assert_allclose(y, dense_mixture(moe, x, gates * kept), atol=1e-5, rtol=1e-5)
  dropped = flat_reports(metrics)["dropped_fraction"] / 2
  np.testing.assert_allclose(dropped, 1 - 2 * c / (2 * t), rtol=1e-6)


def test_expert_choice_takes_each_experts_top_tokens():
  moe = layer(7, moe_router="expert_choice", moe_capacity_factor=1.0)
  x = inputs(8, b=2, t=10)
  probs = jax.nn.softmax(moe.router.logits(x), axis=-1)
  c = capacity_of(moe.config, 10)  # 1.0 · 2 · 10 / 4 = 5 tokens per expert
  kth = jnp.sort(probs, axis=1)[:, -c][:, None, :]
  gates = jnp.where(probs >= kth, probs, 0.0)
  assert np.all(np.asarray((gates > 0).sum(axis=1)) == c)
  np.testing.assert_allclose(moe(x), dense_mixture(moe, x, gates), atol=1e-5, rtol=1e-5)


def test_shared_experts_add_a_gated_dense_mlp():
  moe = layer(9, moe_shared_experts=2, moe_shared_gate=True)
  x = inputs(10)
  gates, _ = token_choice_gates(moe, x)
  shared = moe.shared(x) * jax.nn.sigmoid(moe.shared_gate(x))
  assert moe.shared.up.kernel.shape == (BASE.d_model, 2 * 40)
  np.testing.assert_allclose(moe(x), dense_mixture(moe, x, gates) + shared, atol=2e-5, rtol=1e-4)


def test_router_gates():
  logits = jax.random.normal(jax.random.key(11), (2, 5, 4))
  softmax_topk = layer(0).router.route(logits)
  topk_softmax = layer(0, moe_gate_order="topk_softmax").router.route(logits)
  np.testing.assert_allclose(softmax_topk.weights, topk_softmax.weights, rtol=1e-6)  # Mixtral's two forms
  np.testing.assert_allclose(softmax_topk.weights.sum(-1), 1.0, rtol=1e-6)
  raw = layer(0, moe_renormalize=False).router.route(logits)
  np.testing.assert_allclose(raw.weights, jnp.sort(jax.nn.softmax(logits), axis=-1)[..., ::-1][..., :2], rtol=1e-6)
  sigmoid = layer(0, moe_router="sigmoid", moe_top_k=1)
  sigmoid.router.bias[...] = jnp.asarray([0.0, 0.0, 0.0, 10.0])  # the bias picks; the gate stays the score
  routing = sigmoid.router.route(logits)
  assert np.all(np.asarray(routing.experts) == 3)
  np.testing.assert_allclose(routing.weights[..., 0], 1.0)  # renormalized over k = 1


def test_balancing_loss_is_one_at_uniform_routing_and_z_loss_is_the_formula():
  moe = layer(12, moe_aux_loss_weight=1.0, moe_z_loss_weight=1.0)
  moe.router.kernel[...] = jnp.zeros_like(moe.router.kernel[...])  # uniform probabilities
  x = inputs(13, b=2, t=8)
  _, losses, metrics = capture_reports(moe, x)
  losses, metrics = flat_reports(losses), flat_reports(metrics)
  # top-2 of 4 ties picks experts 0 and 1 everywhere: f = (1/2, 1/2, 0, 0), P = 1/4 -> E Σ f P = 1
  np.testing.assert_allclose(losses["weighted_aux_loss"] / 2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["expert_load"] / 2, [0.5, 0.5, 0, 0])
  np.testing.assert_allclose(losses["weighted_z_loss"] / 2, np.log(4.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["router_entropy"] / 2, np.log(4.0), rtol=1e-6)


def test_jitter_only_in_training():
  moe = layer(14, moe_jitter=0.1)
  x = inputs(15)
  np.testing.assert_array_equal(moe(x), capture_reports(moe, x)[0])  # no rng: no noise
  noisy = capture_reports(moe, x, rng=jax.random.key(0))[0]
  assert float(jnp.abs(noisy - moe(x)).max()) > 0


def test_expert_choice_refuses_to_decode():
  model = Transformer(dataclasses.replace(BASE, moe_router="expert_choice"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expert_choice.*cannot decode"):
    model.init_cache(1, 8)


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_top_k=5), "moe_top_k=5 exceeds model.moe_num_experts=4"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor=0.0 must be > 0"),
    (dict(moe_router="hash"), "model.moe_router"),
    (dict(moe_dispatch="dropping"), "model.moe_dispatch"),
    (dict(moe_num_experts=0), "model.moe_num_experts"),
    (dict(moe_shared_gate=True), "moe_shared_experts=0"),
])
def test_bad_moe_config_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **overrides)
