"""Attention variants inside the LM: caches for every variant, sliding windows, gates,
implementations, and the attention-sink measure."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train.step import forward_with_sinks

BASE = dict(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
VARIANTS = {
    "rope": dict(),
    "rope_linear": dict(rope_scaling="linear", rope_scaling_factor=4.0),
    "rope_ntk": dict(rope_scaling="ntk", rope_scaling_factor=4.0),
    "alibi": dict(positional="alibi"),
    "nope": dict(positional="none"),
    "learned": dict(positional="learned", max_position=64),
    "tape": dict(positional="tape", num_kv_heads=None),
    "window": dict(sliding_window=4),
    "window_alibi_softcap": dict(sliding_window=3, positional="alibi", logit_soft_cap=5.0),
    "gate_elementwise": dict(attention_gate="elementwise"),
    "gate_headwise": dict(attention_gate="headwise", num_kv_heads=1),
    "softcap": dict(logit_soft_cap=2.0),
}


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 53, jnp.int32)


def randomized(model, seed=0, scale=0.3):
  """Every parameter random, so zero-initialized parts (TAPE) are exercised too."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decode_equals_forward(name):
  """Prefill 7 tokens (longer than the windows), then decode one at a time."""
  model = randomized(Transformer(ModelConfig(**{**BASE, **VARIANTS[name]}), rngs=nnx.Rngs(1)))
  t = tokens(2, (2, 13))
  full = model(t)
  cache = model.init_cache(2, 16)
  logits, cache = model.decode(t[:, :7], cache)
  steps = [logits]
  for i in range(7, 13):
    logits, cache = model.decode(t[:, i : i + 1], cache)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


def test_sliding_window_uses_a_ring_buffer_of_the_window_size():
  model = Transformer(ModelConfig(**{**BASE, "sliding_window": 4}), rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 100)
  assert cache.layers[0].k.shape == (2, 4, 2, 8)
  assert Transformer(ModelConfig(**BASE), rngs=nnx.Rngs(0)).init_cache(2, 100).layers[0].k.shape == (2, 100, 2, 8)


def test_sliding_window_hides_older_tokens():
  """One layer, window 3: position i sees only tokens i-2..i."""
  model = Transformer(ModelConfig(**{**BASE, "num_layers": 1, "sliding_window": 3}), rngs=nnx.Rngs(0))
  t = tokens(3, (1, 10))
  changed = t.at[:, 2].set((t[:, 2] + 1) % 53)
  a, b = model(t), model(changed)
  chex.assert_trees_all_close(a[:, 5:], b[:, 5:], atol=1e-6)
  assert float(jnp.abs(a[:, 2:5] - b[:, 2:5]).max()) > 1e-4


@pytest.mark.parametrize("name", ["rope", "alibi", "window_alibi_softcap", "tape", "gate_headwise"])
def test_pallas_kernel_inside_the_model_matches_xla(name):
  config = ModelConfig(**{**BASE, **VARIANTS[name]})
  t = tokens(4, (2, 20))
  models = {impl: randomized(Transformer(dataclasses_replace(config, attention_impl=impl), rngs=nnx.Rngs(5)))
            for impl in ("xla", "pallas_interpret")}
  loss = lambda m: jnp.mean(m(t) ** 2)  # noqa: E731
  chex.assert_trees_all_close(models["pallas_interpret"](t), models["xla"](t), atol=1e-4)
  grads = {impl: nnx.state(jax.grad(loss)(m), nnx.Param) for impl, m in models.items()}
  chex.assert_trees_all_close(grads["pallas_interpret"], grads["xla"], atol=1e-4)


def dataclasses_replace(config, **changes):
  import dataclasses
  return dataclasses.replace(config, **changes)


def test_elementwise_gate_at_zero_halves_the_attention_output():
  """sigmoid(0) = 1/2: a zero gate equals the ungated model with o halved."""
  gated = Transformer(ModelConfig(**{**BASE, "attention_gate": "elementwise"}), rngs=nnx.Rngs(0))
  plain = Transformer(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  shared = dict(nnx.to_flat_state(nnx.state(gated, nnx.Param)))
  plain_state = nnx.state(plain, nnx.Param)
  for path, var in nnx.to_flat_state(plain_state):
    value = shared[path][...]
    var.set_value(value / 2 if path[-2:] == ("o", "kernel") else value)
  nnx.update(plain, plain_state)
  for block in gated.blocks:
    block.mixer.gate.kernel.set_value(jnp.zeros_like(block.mixer.gate.kernel[...]))
  t = tokens(5, (2, 9))
  chex.assert_trees_all_close(gated(t), plain(t), atol=1e-5)


def test_gate_shapes():
  e = Transformer(ModelConfig(**{**BASE, "attention_gate": "elementwise"}), rngs=nnx.Rngs(0))
  h = Transformer(ModelConfig(**{**BASE, "attention_gate": "headwise"}), rngs=nnx.Rngs(0))
  assert e.blocks[0].mixer.gate.kernel.shape == (32, 4, 8)
  assert h.blocks[0].mixer.gate.kernel.shape == (32, 4)


def test_attention_sink_of_uniform_attention():
  """With zero queries every visible key gets equal weight: query i gives 1/(i+1) to
  token 0, so the layer's sink measure is the mean of 1/(i+1) over queries 1..t-1."""
  model = Transformer(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  for block in model.blocks:
    block.mixer.q.kernel.set_value(jnp.zeros_like(block.mixer.q.kernel[...]))
  _, sinks = forward_with_sinks(model, tokens(6, (3, 10)))
  assert sorted(sinks) == ["attention_sink/layer_0", "attention_sink/layer_1"]
  expected = np.mean(1.0 / np.arange(2, 11))
  for value in sinks.values():
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_sink_is_zero_where_the_first_token_is_out_of_the_window():
  model = Transformer(ModelConfig(**{**BASE, "sliding_window": 2}), rngs=nnx.Rngs(0))
  for block in model.blocks:
    block.mixer.q.kernel.set_value(jnp.zeros_like(block.mixer.q.kernel[...]))
  _, sinks = forward_with_sinks(model, tokens(6, (1, 10)))
  # query 1 gives 1/2, later queries cannot see token 0 (query 0 is left out)
  for value in sinks.values():
    np.testing.assert_allclose(value, 0.5 / 9, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(positional="tape"), "TAPE keeps position features per head"),
        (dict(attention_impl="cudnn", logit_soft_cap=3.0), "attention_impl='cudnn'"),
        (dict(sliding_window=0), "model.sliding_window=0"),
        (dict(attention_gate="channel"), "model.attention_gate"),
        (dict(rope_scaling="yarn"), "model.rope_scaling"),
    ],
)
def test_bad_attention_configs(overrides, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**BASE, **overrides})
