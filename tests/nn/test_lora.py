"""LoRA (Hu et al. 2021): an adapted model is its base at initialization (B = 0), adds
(alpha / r) A B to each targeted kernel, trains only its adapters, and merges into the
kernels for export."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from jaxlab.nn import ModelConfig, Transformer, merge_lora
from jaxlab.nn.lora import LoRA
from jaxlab.train.optim import make_optimizer

BASE = ModelConfig(vocab_size=37, d_model=24, num_layers=2, num_heads=3, num_kv_heads=1, mlp_dim=40)
OPTIM = ConfigDict(dict(learning_rate=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                        weight_decay=0.1, clip_norm=1.0, trainable=None))


def tokens(seed, shape=(2, 9)):
  return jax.random.randint(jax.random.key(seed), shape, 0, BASE.vocab_size, jnp.int32)


def flat(model, kind=nnx.Param):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def with_random_b(model, seed):
  """The adapters' B drawn at random, so the update is no longer zero."""
  adapters = [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRA)]
  for key, lora in zip(jax.random.split(jax.random.key(seed), len(adapters)), adapters):
    lora.b[...] = 0.3 * jax.random.normal(key, lora.b.shape)
  return model


def test_an_adapted_model_is_its_base_at_initialization():
  base = Transformer(BASE, rngs=nnx.Rngs(0))
  adapted = Transformer(dataclasses.replace(BASE, lora_rank=4), rngs=nnx.Rngs(0))
  base_params, adapted_params = flat(base), flat(adapted)
  assert sorted(n for n in adapted_params if n not in base_params) == [
      f"blocks/{i}/mixer/{m}/lora/{ab}" for i in range(2) for m in ("q", "v") for ab in ("a", "b")]
  for name, value in base_params.items():  # the adapters draw their keys after the base
    np.testing.assert_array_equal(adapted_params[name], value)
  t = tokens(1)
  np.testing.assert_array_equal(np.asarray(adapted(t)), np.asarray(base(t)))


@pytest.mark.parametrize("rank,alpha,targets", [(4, 16.0, r"mixer/(q|v)$"), (3, 5.0, r"ffn/(up|down)$|lm_head")])
def test_the_update_is_alpha_over_rank_times_a_b_on_each_targeted_kernel(rank, alpha, targets):
  config = dataclasses.replace(BASE, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  adapted = with_random_b(Transformer(config, rngs=nnx.Rngs(2)), seed=3)
  params = flat(adapted)
  # The same weights as a plain model: each adapted kernel W + (alpha / r) A B, by numpy.
  plain = Transformer(BASE, rngs=nnx.Rngs(9))
  state = nnx.state(plain, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    value = params[name].astype(np.float64)
    prefix = name.removesuffix("/kernel")
    if f"{prefix}/lora/a" in params:
      a, b = params[f"{prefix}/lora/a"], params[f"{prefix}/lora/b"]
      value = value + alpha / rank * np.tensordot(a.astype(np.float64), b.astype(np.float64), axes=1)
    variable.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(plain, state)
  t = tokens(4)
  expected = plain(t)
  chex.assert_trees_all_close(adapted(t), expected, atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(expected - Transformer(BASE, rngs=nnx.Rngs(2))(t)).max()) > 1e-2  # B moved it
  merged = merge_lora(adapted)
  assert merged.config.lora_rank == 0 and not any(isinstance(m, LoRA) for _, m in nnx.iter_graph(merged))
  chex.assert_trees_all_close(merged(t), expected, atol=2e-5, rtol=2e-5)
  assert any(isinstance(m, LoRA) for _, m in nnx.iter_graph(adapted))  # merging copies the model


def test_bf16_adapters_follow_the_input_dtype():
  adapted = with_random_b(Transformer(dataclasses.replace(BASE, lora_rank=2), rngs=nnx.Rngs(5)), seed=6)
  lora = next(m for _, m in nnx.iter_graph(adapted) if isinstance(m, LoRA))
  x = jax.random.normal(jax.random.key(7), (2, 5, BASE.d_model))
  y16 = lora(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  chex.assert_trees_all_close(y16.astype(jnp.float32), lora(x), atol=5e-2, rtol=5e-2)


def test_only_the_adapters_train_by_default():
  model = Transformer(dataclasses.replace(BASE, lora_rank=4), rngs=nnx.Rngs(0))
  tx, _ = make_optimizer(OPTIM, total_steps=10, lora=True)
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)
  t = tokens(8, (4, 12))

  def loss(params):
    logits = nnx.merge(graphdef, params)(t[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

  start = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
  for _ in range(3):  # A's gradient is zero while B is: it moves from the second step on
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax_apply(params, updates)
  end = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
  changed = {n for n in start if not np.array_equal(start[n], end[n])}
  assert changed == {n for n in start if "/lora/" in n}


def optax_apply(params, updates):
  return jax.tree.map(jnp.add, params, updates)


def test_bad_lora_settings_are_refused_with_the_field():
  with pytest.raises(ValueError, match="model.lora_rank=-1"):
    ModelConfig(lora_rank=-1)
  with pytest.raises(ValueError, match="model.lora_alpha=0"):
    ModelConfig(lora_rank=2, lora_alpha=0)
  with pytest.raises(ValueError, match=r"model.lora_targets='\(q' is not a regular expression"):
    ModelConfig(lora_targets="(q")
  with pytest.raises(ValueError, match=r"model.lora_targets='attn/q' matches no dense layer; .*blocks/0/"):
    Transformer(dataclasses.replace(BASE, lora_rank=2, lora_targets="attn/q"), rngs=nnx.Rngs(0))
