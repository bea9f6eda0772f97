"""The data statistics of the data-aware merges: the input Grams RegMean reads are
``XᵀX / tokens`` of each linear layer's inputs (recomputed here from the captured module
outputs), nothing is recorded outside `capture_input_grams`, and the diagonal Fisher is
the mean over sequences of the squared per-sequence gradient (recomputed here one
sequence at a time)."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.merging import diagonal_fisher, input_grams
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.linear import Linear
from jaxlab.nn.reports import InputGram, capture_input_grams

CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=16)
SHALLOW = dataclasses.replace(CFG, num_layers=1)  # for the Fisher: each diagonal_fisher call compiles


@functools.cache
def split(seed: int = 0, config: ModelConfig = CFG):
  return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def batch(seed: int, b: int, length: int = 8) -> dict:
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return dict(inputs=jax.random.randint(k1, (b, length), 0, CFG.vocab_size),
              targets=jax.random.randint(k2, (b, length), 0, CFG.vocab_size),
              weights=jax.random.bernoulli(k3, 0.7, (b, length)).astype(jnp.float32))


def flat(state) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
          for p, v in nnx.to_flat_state(state)}


@jax.jit
def capture_everything(params, tokens) -> nnx.State:
  """Every intermediate of a forward pass on ``tokens``, with every module's output."""
  graphdef, _, model_state = split()
  model = nnx.merge(graphdef, params, model_state)
  return nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)[1]


def module_outputs(params, tokens) -> dict[str, jax.Array]:
  """Every module's output on ``tokens``, by module path ("blocks/0/ffn_norm")."""
  return {"/".join(map(str, path[:-1])): leaf.get_value()[0]
          for path, leaf in nnx.to_flat_state(capture_everything(params, tokens)) if path[-1] == "__call__"}


def gram(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.T @ x


# ---- input Grams ----------------------------------------------------------------------------
def test_input_grams_are_the_per_token_grams_of_each_linear_layers_inputs():
  graphdef, params, model_state = split()
  batches = [batch(0, 2), batch(1, 2)]  # one shape: one compile
  grams = input_grams(graphdef, params, model_state, batches)
  layers = [f"blocks/{i}/{part}" for i in range(CFG.num_layers)
            for part in ("mixer/q", "mixer/k", "mixer/v", "mixer/o", "ffn/gate", "ffn/up", "ffn/down")]
  assert set(grams) == {f"{name}/kernel" for name in [*layers, "lm_head"]}
  outputs = [module_outputs(params, b["inputs"]) for b in batches]
  tokens = sum(b["inputs"].size for b in batches)
  for i in range(CFG.num_layers):
    ffn_in = sum(gram(out[f"blocks/{i}/ffn_norm"]) for out in outputs) / tokens
    mixer_in = sum(gram(out[f"blocks/{i}/mixer_norm"]) for out in outputs) / tokens
    down_in = sum(gram(jax.nn.silu(out[f"blocks/{i}/ffn/gate"]) * out[f"blocks/{i}/ffn/up"]) for out in outputs)
    expected = {"ffn/up": ffn_in, "ffn/gate": ffn_in, "mixer/q": mixer_in, "mixer/k": mixer_in, "mixer/v": mixer_in,
                "ffn/down": down_in / tokens}
    for part, value in expected.items():
      name = f"blocks/{i}/{part}/kernel"
      assert grams[name].shape == value.shape, name
      np.testing.assert_allclose(grams[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert grams[f"blocks/{i}/mixer/o/kernel"].shape == (CFG.d_model, CFG.d_model)  # [heads x head_dim]²
  np.testing.assert_allclose(grams["lm_head/kernel"], sum(gram(out["final_norm"]) for out in outputs) / tokens,
                             rtol=1e-4, atol=1e-6)


def test_outside_capture_input_grams_a_linear_layer_records_nothing():
  graphdef, params, model_state = split()
  model = nnx.merge(graphdef, params, model_state)
  tokens = batch(2, 2)["inputs"]
  linear = Linear((4,), (3,), ("embed",), ("mlp",), rngs=nnx.Rngs(0))
  before = set(vars(linear))
  x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    nnx.jit(lambda m, t: m(t))(model, tokens)
    linear(jnp.asarray(x))
  assert set(vars(linear)) == before
  assert not flat(nnx.state(model, nnx.Intermediate))
  assert not flat(nnx.state(linear, nnx.Intermediate))
  # capturing the Grams records Σ x xᵀ over the flattened tokens, and leaves nothing behind on the module
  _, captured = capture_input_grams(linear, jnp.asarray(x))
  np.testing.assert_allclose(flat(captured)["input_gram"], gram(x), rtol=1e-5)
  assert not flat(nnx.state(linear, nnx.Intermediate))
  # a capture of every intermediate (as hidden_router's) holds no Gram
  captured = capture_everything(params, tokens)
  assert not any(isinstance(leaf, InputGram) or path[-1] == "input_gram" for path, leaf in nnx.to_flat_state(captured))


# ---- diagonal Fisher ------------------------------------------------------------------------
def direct_empirical_fisher(params, batches) -> dict[str, np.ndarray]:
  """Mean over sequences of (∇ Σ_t w_t log p(target_t | inputs))², one sequence at a time."""
  graphdef, _, model_state = split(0, SHALLOW)

  def log_likelihood(p, inputs, targets, weights):
    logits = nnx.merge(graphdef, p, model_state)(inputs[None, :])[0]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(weights * log_probs[jnp.arange(inputs.shape[0]), targets])

  grad = jax.jit(jax.grad(log_likelihood))
  total, count = None, 0
  for b in batches:
    for s in range(b["inputs"].shape[0]):
      g = {k: np.asarray(v, np.float64) ** 2 for k, v in flat(grad(params, b["inputs"][s], b["targets"][s],
                                                                  b["weights"][s])).items()}
      total = g if total is None else {k: total[k] + g[k] for k in g}
      count += 1
  return {k: v / count for k, v in total.items()}


def test_the_empirical_fisher_is_the_mean_squared_per_sequence_gradient():
  graphdef, params, model_state = split(0, SHALLOW)
  batches = [batch(3, 2), batch(4, 2)]
  fisher = flat(diagonal_fisher(graphdef, params, model_state, batches, empirical=True))
  expected = direct_empirical_fisher(params, batches)
  assert fisher.keys() == expected.keys()
  for name in ("blocks/0/ffn/up/kernel", "blocks/0/mixer/q/kernel", "blocks/0/ffn_norm/scale", "embed/table",
               "lm_head/kernel"):
    np.testing.assert_allclose(fisher[name], expected[name], rtol=2e-4, atol=1e-10, err_msg=name)


def test_the_fisher_is_shaped_like_the_parameters_nonnegative_and_finite():
  graphdef, params, model_state = split(0, SHALLOW)
  fisher = diagonal_fisher(graphdef, params, model_state, [batch(5, 2)], seed=1)  # labels sampled from the model
  assert jax.tree.structure(fisher) == jax.tree.structure(params)
  values = flat(fisher)
  assert {k: v.shape for k, v in values.items()} == {k: v.shape for k, v in flat(params).items()}
  for name, value in values.items():
    assert np.all(np.isfinite(value)) and np.all(value >= 0), name
    assert np.any(value > 0), name
