"""The LM: shapes, logical axis names, caches, generation, remat, variants."""

import contextlib
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from jax import ad_checkpoint

from jaxlab.nn import ModelConfig, Transformer, generate
from jaxlab.sharding import LOGICAL_AXES

TINY = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


def tokens(seed, shape, vocab=61):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


class TransformerTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits_shape_and_finite(self):
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    logits = self.variant(lambda m, t: m(t))(model, tokens(1, (3, 7)))
    chex.assert_shape(logits, (3, 7, 61))
    chex.assert_tree_all_finite(logits)

  def test_every_parameter_has_logical_names(self):
    model = Transformer(ModelConfig(**TINY, tie_embeddings=False), rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.assertNotEmpty(params)
    for p in params:
      names = p.get_metadata()["out_sharding"]
      self.assertLen(names, p.ndim)
      self.assertTrue(set(names) <= set(LOGICAL_AXES), names)

  def test_causal(self):
    """Changing a later token never changes earlier logits."""
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    t = tokens(2, (2, 9))
    changed = t.at[:, 5].set((t[:, 5] + 1) % 61)
    a, b = model(t), model(changed)
    chex.assert_trees_all_close(a[:, :5], b[:, :5], atol=1e-6)
    self.assertGreater(float(jnp.abs(a[:, 5:] - b[:, 5:]).max()), 1e-4)

  @parameterized.parameters(
      dict(),
      dict(num_kv_heads=1),
      dict(num_kv_heads=4, tie_embeddings=True),
      dict(norm="layernorm", mlp_activation="gelu", mlp_bias=True, attention_bias=True),
      dict(positional="none"),
      dict(ffns=("mlp", "moe"), moe_num_experts=4),
      dict(ffns=("moe",), moe_router="sigmoid", moe_top_k=1, moe_shared_experts=1, moe_shared_gate=True),
  )
  def test_decode_equals_forward(self, **overrides):
    """Prefill a prefix, then decode one token at a time: logits equal the full forward."""
    config = ModelConfig(**{**TINY, **overrides})
    model = Transformer(config, rngs=nnx.Rngs(3))
    t = tokens(4, (2, 11))
    full = model(t)
    caches = model.init_cache(2, 16)
    logits, caches = model.decode(t[:, :5], caches)
    steps = [logits]
    for i in range(5, 11):
      logits, caches = model.decode(t[:, i : i + 1], caches)
      steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)

  def test_greedy_generation_is_argmax_of_forward(self):
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(5))
    prompt = tokens(6, (3, 6))
    new = generate(model, prompt, 12, temperature=0.0)
    chex.assert_shape(new, (3, 12))
    logits = model(jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 5:-1], -1)), np.asarray(new))

  def test_sampling_respects_top_k_and_rng(self):
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(5))
    prompt = tokens(7, (2, 4))
    a = generate(model, prompt, 20, temperature=1.0, top_k=3, rng=jax.random.key(1))
    b = generate(model, prompt, 20, temperature=1.0, top_k=3, rng=jax.random.key(1))
    c = generate(model, prompt, 20, temperature=1.0, top_k=3, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    # Every sampled token is among the 3 most likely under the model.
    logits = model(jnp.concatenate([prompt, a], axis=1))[:, 3:-1]
    top3 = jax.lax.top_k(logits, 3)[1]
    self.assertTrue(bool(jnp.all(jnp.any(top3 == a[..., None], axis=-1))))

  @parameterized.parameters("full", "save_dots")
  def test_remat_keeps_values_and_gradients(self, policy):
    t = tokens(8, (2, 8))
    plain = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    remat = Transformer(ModelConfig(**TINY, remat=policy), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(m(t) ** 2)  # noqa: E731
    chex.assert_trees_all_close(
        nnx.state(jax.grad(loss)(plain)), nnx.state(jax.grad(loss)(remat)), atol=1e-6
    )

  def test_remat_policies_save_fewer_residuals(self):
    """Residuals kept for the backward pass: full < save_dots < none."""
    t = tokens(8, (2, 8))

    def residual_count(policy):
      model = Transformer(ModelConfig(**TINY, remat=policy), rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(model)
      f = lambda s: jnp.sum(nnx.merge(graphdef, s)(t))  # noqa: E731
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(f, state)
      return len(out.getvalue().splitlines())

    counts = {p: residual_count(p) for p in ("full", "save_dots", "none")}
    self.assertLess(counts["full"], counts["save_dots"], counts)
    self.assertLess(counts["save_dots"], counts["none"], counts)

  def test_gqa_shapes_share_kv(self):
    model = Transformer(ModelConfig(**{**TINY, "num_kv_heads": 1}), rngs=nnx.Rngs(0))
    chex.assert_shape(model.blocks[0].mixer.k.kernel[...], (32, 1, 8))
    chex.assert_shape(model.blocks[0].mixer.q.kernel[...], (32, 4, 8))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=5), "d_model"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(remat="sometimes"), "model.remat"),
        (dict(mixers=("nonsense",)), "nonsense"),
        (dict(d_model=0), "model.d_model"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    Transformer(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0))


def test_unknown_config_field_is_rejected():
  with pytest.raises(ValueError, match="num_expert"):
    ModelConfig.from_dict({"num_expert": 4})


class ShiftMixer(nnx.Module):
  """A test mixer: position t outputs x_{t-1}; its cache is the last token seen."""

  def __init__(self, config, *, layer, rngs):
    del layer, rngs
    self.d_model = config.d_model

  def __call__(self, x, positions):
    del positions
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]

  def init_cache(self, batch, max_len, dtype=jnp.float32):
    del max_len
    return jnp.zeros((batch, 1, self.d_model), dtype)

  def decode(self, x, positions, cache):
    del positions
    shifted = jnp.concatenate([cache, x], axis=1)
    return shifted[:, :-1], shifted[:, -1:]


def test_registered_mixers_make_hybrid_layer_patterns(monkeypatch):
  from jaxlab.nn import MIXERS, Attention

  monkeypatch.setitem(MIXERS, "shift", ShiftMixer)
  config = ModelConfig(**{**TINY, "num_layers": 4, "mixers": ("shift", "shift", "attention")})
  model = Transformer(config, rngs=nnx.Rngs(0))
  kinds = [type(block.mixer) for block in model.blocks]
  assert kinds == [ShiftMixer, ShiftMixer, Attention, ShiftMixer]
  t = tokens(9, (2, 7))
  caches = model.init_cache(2, 7)
  steps = []
  for i in range(7):
    logits, caches = model.decode(t[:, i : i + 1], caches)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), model(t), atol=1e-5)
