"""Dense-to-sparse routers (EvoMoE's Gumbel gate, the activation gate): the temperature
schedule, the gate against its formula written out, dense before the switch step and at
most k experts after it, and the clock the train step advances."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from test_moe import BASE, dense_mixture, inputs, layer

from jaxlab.nn import dense_to_sparse as dts
from jaxlab.nn.config import MOE_DTS_ACTIVATIONS
from jaxlab.nn.reports import capture_reports, flat_reports
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import init_train_state, model_graphdef
from jaxlab.train.step import train_step

DTS = dict(moe_router="dense_to_sparse", moe_dts_decay_steps=10, moe_dts_switch_step=20)


def test_temperature_falls_from_max_to_min_then_stays():
  config = dataclasses.replace(BASE, **DTS, moe_dts_max_temperature=2.0, moe_dts_min_temperature=0.5)
  at = lambda c, s: float(dts.temperature(c, jnp.asarray(s)))  # noqa: E731
  assert [at(config, s) for s in (0, 5, 10, 15)] == pytest.approx([2.0, 1.25, 0.5, 0.5])
  cosine = dataclasses.replace(config, moe_dts_schedule="cosine")
  assert [at(cosine, s) for s in (0, 5, 10)] == pytest.approx([2.0, 1.25, 0.5])
  assert at(cosine, 2) > at(config, 2)  # a half cosine falls slowly at first


def test_gates_equal_their_formulas_at_a_fixed_temperature():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 4)), np.float64)
  tau = 0.7
  gumbel = dataclasses.replace(BASE, **DTS)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  hand = p ** (1 / tau) / (p ** (1 / tau)).sum(-1, keepdims=True)  # softmax(log p / τ), no noise
  np.testing.assert_allclose(dts.gate_probabilities(gumbel, jnp.asarray(logits, jnp.float32), tau, None), hand,
                             rtol=1e-5)
  key = jax.random.key(1)
  noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
  scores = np.exp((np.log(p) + noise) / tau)
  np.testing.assert_allclose(dts.gate_probabilities(gumbel, jnp.asarray(logits, jnp.float32), tau, key),
                             scores / scores.sum(-1, keepdims=True), rtol=1e-4)
  for name, sigma in [("identity", lambda x: x), ("tanh", np.tanh), ("sigmoid", lambda x: 1 / (1 + np.exp(-x)))]:
    config = dataclasses.replace(BASE, **DTS, moe_dts_gate="activation", moe_dts_activation=name)
    scores = np.exp(sigma(logits) / tau)
    np.testing.assert_allclose(dts.gate_probabilities(config, jnp.asarray(logits, jnp.float32), tau, None),
                               scores / scores.sum(-1, keepdims=True), rtol=1e-5, err_msg=name)
  assert set(dts.ACTIVATIONS) == set(MOE_DTS_ACTIVATIONS)


def _training(moe, x, seed=0):
  y, _, metrics = capture_reports(moe, x, rng=jax.random.key(seed))
  return y, flat_reports(metrics)


def test_before_the_switch_every_expert_weighs_in_at_a_high_temperature():
  """The activation gate has no noise, so the layer is Σ_e g_e FFN_e(x) with g by hand."""
  moe = layer(3, **DTS, moe_dts_gate="activation", moe_dts_max_temperature=50.0)
  x = inputs(4)
  y, metrics = _training(moe, x)
  logits = np.asarray(moe.router.logits(x), np.float64)
  scores = np.exp(np.tanh(logits) / 50.0)
  gates = scores / scores.sum(-1, keepdims=True)
  assert gates.min() > moe.config.moe_dts_threshold  # all four experts above the threshold
  np.testing.assert_allclose(y, dense_mixture(moe, x, jnp.asarray(gates, jnp.float32)), atol=2e-5, rtol=1e-4)
  b = x.shape[0]
  np.testing.assert_allclose(metrics["active_experts"] / b, BASE.moe_num_experts)
  np.testing.assert_allclose(metrics["temperature"] / b, 50.0, rtol=1e-6)
  _, gumbel_metrics = _training(layer(3, **DTS, moe_dts_max_temperature=50.0), x)
  np.testing.assert_allclose(gumbel_metrics["active_experts"] / b, BASE.moe_num_experts)


def test_gates_at_or_under_the_threshold_are_masked():
  moe = layer(5, **DTS, moe_dts_gate="activation", moe_dts_activation="identity", moe_dts_max_temperature=0.3, moe_dts_min_temperature=0.3,
              moe_dts_threshold=0.05)
  moe.router.kernel[...] = moe.router.kernel[...] / jnp.std(moe.router.kernel[...])
  x = inputs(6)
  gates = np.asarray(jax.nn.softmax(moe.router.logits(x) / 0.3, axis=-1))
  assert np.any((gates > 0) & (gates <= 0.05)) and np.any(gates > 0.05)
  y, metrics = _training(moe, x)
  np.testing.assert_allclose(metrics["active_experts"] / x.shape[0], np.mean(np.sum(gates > 0.05, -1)), rtol=1e-6)
  np.testing.assert_allclose(y, dense_mixture(moe, x, jnp.asarray(np.where(gates > 0.05, gates, 0))), atol=2e-5,
                             rtol=1e-4)


@pytest.mark.parametrize("gate", ["gumbel", "activation"])
def test_after_the_switch_at_most_k_experts_per_token(gate):
  moe = layer(7, **DTS, moe_dts_gate=gate, moe_top_k=2)
  moe.router.step[...] = jnp.asarray(DTS["moe_dts_switch_step"])
  x = inputs(8)
  y, metrics = _training(moe, x)
  assert float(metrics["active_experts"]) / x.shape[0] <= 2 + 1e-6
  if gate == "activation":  # no noise: the top 2 of the thresholded gate, unrenormalized
    gates = dts.thresholded(moe.config, dts.gate_probabilities(moe.config, moe.router.logits(x), 0.5, None))
    kth = jnp.sort(gates, axis=-1)[..., -2:-1]
    np.testing.assert_allclose(y, dense_mixture(moe, x, jnp.where(gates >= kth, gates, 0)), atol=2e-5, rtol=1e-4)
  # outside training: always the top k, without noise
  evaluated = layer(7, **DTS, moe_dts_gate=gate, moe_top_k=2)
  gates = dts.thresholded(evaluated.config, dts.gate_probabilities(evaluated.config, evaluated.router.logits(x),
                                                                      2.0, None))
  kth = jnp.sort(gates, axis=-1)[..., -2:-1]
  np.testing.assert_allclose(evaluated(x), dense_mixture(evaluated, x, jnp.where(gates >= kth, gates, 0)),
                             atol=2e-5, rtol=1e-4)


def test_the_train_step_advances_the_clock_and_logs_the_temperature():
  model = dataclasses.replace(BASE, **{**DTS, "moe_dts_decay_steps": 2})
  optim = ConfigDict(dict(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.1, clip_norm=1.0))
  tx, schedule = make_optimizer(optim, total_steps=10)
  tokens = jax.random.randint(jax.random.key(9), (3, 4, 13), 0, BASE.vocab_size)
  state = init_train_state(model, tx, seed=0)
  step = jax.jit(functools.partial(train_step, graphdef=model_graphdef(model), tx=tx, schedule=schedule,
                                   grad_accum=1, compute_dtype="float32"))
  temperatures = []
  for i in range(3):
    batch = {"inputs": tokens[i, :, :-1], "targets": tokens[i, :, 1:], "weights": jnp.ones((4, 12))}
    state, metrics = step(state, batch)
    temperatures.append(float(metrics["ffn/temperature/layer_0"]))
    assert BASE.moe_top_k < float(metrics["ffn/active_experts/layer_0"]) <= BASE.moe_num_experts  # dense
  assert temperatures == pytest.approx([2.0, 1.25, 0.5])
  assert int(state.model_state["blocks"][0]["ffn"]["router"]["step"][...]) == 3
  trained = nnx.merge(model_graphdef(model), state.params, state.model_state)
  assert np.isfinite(np.asarray(trained(tokens[0, :, :-1]))).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_dts_gate="noisy"), "model.moe_dts_gate"),
    (dict(moe_dts_activation="relu"), "model.moe_dts_activation"),
    (dict(moe_dts_min_temperature=3.0), "moe_dts_min_temperature"),
    (dict(moe_dts_threshold=1.0), "moe_dts_threshold=1.0"),
    (dict(moe_dispatch="capacity"), "moe_dispatch='dropless'"),
])
def test_bad_dense_to_sparse_config_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **DTS, **overrides)
