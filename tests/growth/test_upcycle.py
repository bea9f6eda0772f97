"""Sparse upcycling: the upcycled MoE computes the dense model's function where the
paper's construction says it must, the experts are the MLP's copies, optimizer moments
are carried, and configs it cannot upcycle are refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.growth import upcycle
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train.state import init_train_state, model_graphdef

DENSE = ModelConfig(vocab_size=61, d_model=24, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=40)
MOE = dataclasses.replace(DENSE, ffns=("moe",), moe_num_experts=4, moe_top_k=2)


def dense_model(seed=0):
  return Transformer(DENSE, rngs=nnx.Rngs(seed))


def upcycled(model, target, seed=5):
  _, params, _ = nnx.split(model, nnx.Param, ...)
  new_params = upcycle(params, DENSE, target, seed=seed)
  graphdef, _, model_state = nnx.split(nnx.eval_shape(lambda: Transformer(target, rngs=nnx.Rngs(0))), nnx.Param, ...)
  model_state = jax.tree.map(jnp.zeros_like, model_state)
  return nnx.merge(graphdef, new_params, model_state)


TOKENS = jax.random.randint(jax.random.key(1), (2, 11), 0, DENSE.vocab_size)
logits = nnx.jit(lambda model: model(TOKENS))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_gate_order="topk_softmax", moe_renormalize=False),
    dict(ffns=("mlp", "moe"), moe_top_k=1),
    dict(moe_router="sigmoid", moe_top_k=3),
], ids=["topk_renormalized", "topk_softmax", "every_other_layer_top1", "sigmoid_renormalized"])
def test_the_upcycled_model_computes_the_dense_function(overrides):
  dense = dense_model(2)
  moe = upcycled(dense, dataclasses.replace(MOE, **overrides))
  np.testing.assert_allclose(logits(moe), logits(dense), atol=2e-5, rtol=1e-5)


def test_without_renormalized_gates_the_function_changes():
  dense = dense_model(2)
  moe = upcycled(dense, dataclasses.replace(MOE, moe_renormalize=False))  # gates sum to < 1
  assert float(jnp.abs(logits(moe) - logits(dense)).max()) > 1e-3


def test_experts_are_copies_and_the_router_is_the_targets_own_init():
  dense = dense_model(3)
  moe = upcycled(dense, MOE, seed=7)
  for name in ("gate", "up", "down"):
    experts = np.asarray(getattr(moe.blocks[1].ffn.experts, name)[...])
    for e in range(MOE.moe_num_experts):
      np.testing.assert_array_equal(experts[e], getattr(dense.blocks[1].ffn, name).kernel[...])
  own = Transformer(MOE, rngs=nnx.Rngs(params=7))
  np.testing.assert_allclose(moe.blocks[0].ffn.router.kernel[...], own.blocks[0].ffn.router.kernel[...], rtol=1e-6)
  np.testing.assert_array_equal(moe.embed.table[...], dense.embed.table[...])


def test_a_train_state_carries_its_optimizer_moments():
  tx = optax.adamw(1e-3)
  state = init_train_state(DENSE, tx, seed=0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  _, opt_state = jax.jit(tx.update)(grads, state.opt_state, state.params)
  state = state.replace(opt_state=opt_state)
  new = jax.jit(lambda s: upcycle(s, DENSE, MOE))(state)
  fresh = init_train_state(MOE, tx, seed=0)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(fresh.opt_state)
  mu = new.opt_state[0].mu["blocks"][2]["ffn"]
  np.testing.assert_allclose(mu["experts"]["up"][...], 0.05)  # (1 - b1) x 0.5, in every expert
  np.testing.assert_array_equal(mu["router"]["kernel"][...], 0.0)
  assert int(new.opt_state[0].count) == 1
  model = nnx.merge(model_graphdef(MOE), new.params, new.model_state)
  np.testing.assert_allclose(logits(model), logits(nnx.merge(model_graphdef(DENSE), state.params, state.model_state)),
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target, message", [
    (dataclasses.replace(MOE, d_model=32, num_heads=4), "model.d_model: 24 -> 32"),
    (dataclasses.replace(MOE, moe_expert_dim=20), "moe_expert_dim=20 must be None or the dense model.mlp_dim=40"),
    (dataclasses.replace(MOE, moe_shared_experts=1), "moe_shared_experts=0"),
    (dataclasses.replace(DENSE, ffns=("none",)), "layer 0: upcycling turns an 'mlp' into a 'moe'"),
])
def test_what_cannot_be_upcycled_is_refused_by_name(target, message):
  _, params, _ = nnx.split(dense_model(), nnx.Param, ...)
  with pytest.raises(ValueError, match=message):
    upcycle(params, DENSE, target)
