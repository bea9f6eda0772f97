"""The train step: accumulation, precision, and the state it returns."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jaxlab.nn import ModelConfig
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import init_train_state, model_graphdef
from jaxlab.train.step import eval_step, train_step

MODEL = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
OPTIM = ConfigDict(dict(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                        eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def batch(seed, b=8, t=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 50, (b, t + 1)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.3).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


MOE = dataclasses.replace(MODEL, ffns=("mlp", "moe"), moe_num_experts=4, moe_expert_dim=24,
                          moe_router="sigmoid", moe_aux_loss_weight=0.1, moe_z_loss_weight=0.01)


def run(steps, grad_accum=1, compute_dtype="float32", fixed_batch=False, model=MODEL):
  tx, schedule = make_optimizer(OPTIM, total_steps=10)
  state = init_train_state(model, tx, seed=0)
  step = jax.jit(functools.partial(
      train_step, graphdef=model_graphdef(model), tx=tx, schedule=schedule,
      grad_accum=grad_accum, compute_dtype=compute_dtype))
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch(0 if fixed_batch else i))
    losses.append(float(metrics["loss"]))
  return state, losses, metrics


def test_loss_is_the_weighted_token_mean_and_falls():
  state, losses, metrics = run(6, fixed_batch=True)
  assert losses[-1] < losses[0] - 0.1
  assert int(state.step) == 6
  assert float(metrics["grad_norm"]) > 0 and float(metrics["learning_rate"]) > 0
  # eval agrees with the definition: sum over tokens of weight x CE, and of weights
  graphdef = model_graphdef(MODEL)
  b = batch(0)
  sums = eval_step(state, b, graphdef=graphdef, compute_dtype="float32")
  logits = nnx.merge(graphdef, state.params, state.model_state)(b["inputs"])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, b["targets"][..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(sums["loss_sum"], jnp.sum(nll * b["weights"]), rtol=1e-5)
  assert float(sums["weight_sum"]) == float(b["weights"].sum())


def test_gradient_accumulation_equals_the_full_batch():
  full_state, full_losses, _ = run(3, grad_accum=1)
  accum_state, accum_losses, _ = run(3, grad_accum=4)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  chex.assert_trees_all_close(accum_state.params, full_state.params, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_is_exact_with_moe_losses_and_state():
  """The MoE layers' balancing and z losses and the balancing-bias update see the whole
  batch whether it comes in one piece or four."""
  full_state, full_losses, full_metrics = run(3, grad_accum=1, model=MOE)
  accum_state, accum_losses, accum_metrics = run(3, grad_accum=4, model=MOE)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  chex.assert_trees_all_close(accum_state.params, full_state.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(accum_state.model_state, full_state.model_state, atol=1e-6)
  for key in ("ffn/weighted_aux_loss/layer_1", "ffn/weighted_z_loss/layer_1", "ffn/expert_load/layer_1/0"):
    np.testing.assert_allclose(accum_metrics[key], full_metrics[key], rtol=1e-5)
  bias = full_state.model_state["blocks"][1]["ffn"]["router"]["bias"][...]
  assert np.any(np.asarray(bias) != 0)  # the bias moved, by multiples of the update rate
  np.testing.assert_allclose(np.abs(np.asarray(bias)) % MOE.moe_bias_update_rate, 0, atol=1e-7)


def test_bfloat16_compute_keeps_float32_master_weights():
  f32_state, f32_losses, _ = run(3)
  bf16_state, bf16_losses, _ = run(3, compute_dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_state.params))
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=2e-2)
  assert bf16_losses != f32_losses  # the compute really ran in bf16


def test_rng_advances_every_step():
  state0, _, _ = run(1)
  state1, _, _ = run(2)
  assert not np.array_equal(state0.rng, state1.rng)


def test_a_step_with_a_nan_gradient_changes_nothing(nan_gradient_on_doubled_weights):
  """The loss is finite, the gradient NaN: the step reports it and returns the state as it was."""
  tx, schedule = make_optimizer(OPTIM, total_steps=10)
  state = init_train_state(MODEL, tx, seed=0)
  step = jax.jit(functools.partial(train_step, graphdef=model_graphdef(MODEL), tx=tx, schedule=schedule,
                                   grad_accum=2, compute_dtype="float32"))
  state, metrics = step(state, batch(0))
  assert bool(metrics["finite"]) and int(state.step) == 1
  poisoned = batch(1)
  poisoned["weights"] = poisoned["weights"] * 2
  after, metrics = step(state, poisoned)
  assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"])
  chex.assert_trees_all_equal(after, state)
