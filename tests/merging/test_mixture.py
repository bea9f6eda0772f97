"""FFN-level mixtures of dense models: a mixture whose router always picks source i
computes the dense model made of the shared model with source i's MLPs (source i itself
when it is the shared one), in the hybrid variant too; `hidden_router`'s columns are the
normalized mean FFN inputs of each source's data; configs that cannot be mixed are
refused by name."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import hidden_router, mix, mixture_config
from jaxlab.merging.mixture import check_mixable
from jaxlab.nn import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=16)
SOURCES = [nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)), nnx.Param, ...) for seed in (10, 11, 12)]
GRAPHDEF, _, MODEL_STATE = SOURCES[0]
PARAMS = [p for _, p, _ in SOURCES]
TOKENS = jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size)


def flat(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def with_values(state: nnx.State, values: dict) -> nnx.State:
  """``state`` with the values of the variables named in ``values`` replaced (all of them must be)."""
  out = []
  for path, variable in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    out.append((path, variable.replace(jnp.asarray(values[name])) if name in values else variable))
  return nnx.from_flat_state(out)


@jax.jit
def dense_logits(params, tokens):
  return nnx.merge(GRAPHDEF, params, MODEL_STATE)(tokens)


@functools.cache
def mixture_forward(target: ModelConfig):
  """The target's jitted forward (params, model state, tokens) and its model state's variable names."""
  graphdef, _, model_state = nnx.split(nnx.eval_shape(lambda: Transformer(target, rngs=nnx.Rngs(0))), nnx.Param, ...)
  names = [name for name in flat(jax.tree.map(lambda _: np.zeros(()), model_state))]
  assert names and all(name.endswith("/ffn/router/bias") for name in names)
  return jax.jit(lambda p, s, t: nnx.merge(graphdef, p, s)(t)), model_state, names


def mixture_logits(target: ModelConfig, params: nnx.State, picked: int):
  """The mixture's logits with its sigmoid routers' balancing biases making every token choose expert
  ``picked`` (the biases shift the choice, never the gates)."""
  forward, model_state, names = mixture_forward(target)
  bias = np.zeros(target.moe_num_experts, np.float32)
  bias[picked] = 1e4
  return forward(params, with_values(model_state, {name: bias for name in names}), TOKENS)


def zero_routers(target):
  return {layer: jnp.zeros((CFG.d_model, target.moe_num_experts)) for layer in range(CFG.num_layers)}


def dense_with_ffns_of(shared: int, picked: int, layers) -> nnx.State:
  """Source ``shared``'s parameters with the FFNs of ``layers`` taken from source ``picked``."""
  other = flat(PARAMS[picked])
  return with_values(PARAMS[shared], {name: value for name, value in other.items()
                                      if name.startswith(tuple(f"blocks/{layer}/ffn/" for layer in layers))})


# ---- the mixture computes the sources' functions --------------------------------------------
@pytest.mark.parametrize("shared,picked", [(0, 0), (1, 1), (2, 2), (0, 2)])
def test_a_mixture_whose_router_always_picks_source_i_computes_source_i(shared, picked):
  target = mixture_config(CFG, 3, top_k=1, moe_router="sigmoid")
  assert target.ffns == ("moe", "moe") and target.moe_renormalize  # top-1 renormalized: the gate is 1
  params = mix(PARAMS, CFG, target, shared=PARAMS[shared], routers=zero_routers(target))
  expected = dense_logits(dense_with_ffns_of(shared, picked, range(CFG.num_layers)), TOKENS)
  if shared == picked:
    expected_is_source = dense_logits(PARAMS[picked], TOKENS)
    np.testing.assert_array_equal(expected, expected_is_source)
  np.testing.assert_allclose(mixture_logits(target, params, picked), expected, atol=1e-5, rtol=1e-5)


def test_the_experts_are_the_sources_mlps_and_the_rest_is_the_shared_model():
  target = mixture_config(CFG, 3, top_k=1, moe_router="sigmoid")
  routers = {layer: jnp.full((CFG.d_model, 3), float(layer)) for layer in range(CFG.num_layers)}
  params = flat(mix(PARAMS, CFG, target, shared=PARAMS[1], routers=routers))
  sources, shared = [flat(p) for p in PARAMS], flat(PARAMS[1])
  for layer in range(CFG.num_layers):
    for name in ("gate", "up", "down"):
      stack = params.pop(f"blocks/{layer}/ffn/experts/{name}")
      for e in range(3):
        np.testing.assert_array_equal(stack[e], sources[e][f"blocks/{layer}/ffn/{name}/kernel"])
    np.testing.assert_array_equal(params.pop(f"blocks/{layer}/ffn/router/kernel"), routers[layer])
  for name, value in params.items():
    np.testing.assert_array_equal(value, shared[name], err_msg=name)


def test_the_hybrid_mixture_keeps_the_first_layers_dense_with_the_shared_ffn():
  target = mixture_config(CFG, 3, dense_layers=1, top_k=1, moe_router="sigmoid")
  assert target.ffns == ("mlp", "moe")
  params = mix(PARAMS, CFG, target, shared=PARAMS[0], routers={1: jnp.zeros((CFG.d_model, 3))})
  values, shared = flat(params), flat(PARAMS[0])
  assert not any(name.startswith("blocks/0/ffn/experts") or name.startswith("blocks/0/ffn/router") for name in values)
  for name in ("gate", "up", "down"):
    np.testing.assert_array_equal(values[f"blocks/0/ffn/{name}/kernel"], shared[f"blocks/0/ffn/{name}/kernel"])
  for picked in (0, 2):
    expected = dense_logits(dense_with_ffns_of(0, picked, [1]), TOKENS)
    np.testing.assert_allclose(mixture_logits(target, params, picked), expected, atol=1e-5, rtol=1e-5)


# ---- hidden_router --------------------------------------------------------------------------
def test_hidden_router_columns_are_the_normalized_mean_ffn_inputs_of_each_sources_data():
  keys = jax.random.split(jax.random.key(7), 6)
  data = [[jax.random.randint(keys[2 * e + b], (2, 6), 0, CFG.vocab_size) for b in range(2)] for e in range(3)]
  routers = hidden_router(GRAPHDEF, PARAMS[1], MODEL_STATE, data)
  assert sorted(routers) == list(range(CFG.num_layers))

  @jax.jit
  def ffn_norm_outputs(tokens):
    model = nnx.merge(GRAPHDEF, PARAMS[1], MODEL_STATE)
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
    return [captured["blocks"][layer]["ffn_norm"]["__call__"].get_value()[0] for layer in range(CFG.num_layers)]

  outputs = [[ffn_norm_outputs(tokens) for tokens in batches] for batches in data]
  for layer, kernel in routers.items():
    assert kernel.shape == (CFG.d_model, 3)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5)
    for e in range(3):
      hidden = np.concatenate([np.asarray(out[layer], np.float64).reshape(-1, CFG.d_model) for out in outputs[e]])
      mean = hidden.mean(axis=0)
      np.testing.assert_allclose(kernel[:, e], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)
  target = mixture_config(CFG, 3)
  params = flat(mix(PARAMS, CFG, target, shared=PARAMS[1], routers=routers))
  np.testing.assert_array_equal(params["blocks/1/ffn/router/kernel"], routers[1])


# ---- refusals -------------------------------------------------------------------------------
def test_configs_that_cannot_be_mixed_are_refused_by_name():
  with pytest.raises(ValueError, match=r"every layer must be 'mlp'"):
    check_mixable(dataclasses.replace(CFG, ffns=("moe",), moe_num_experts=4), 3, 0, 1)
  with pytest.raises(ValueError, match=r"every layer must be 'mlp'"):
    mixture_config(dataclasses.replace(CFG, ffns=("mlp", "moe"), moe_num_experts=4), 3)
  with pytest.raises(ValueError, match=r"mlp_bias=True"):
    check_mixable(dataclasses.replace(CFG, mlp_bias=True), 3, 0, 1)
  with pytest.raises(ValueError, match=r"at least two source models; got 1"):
    check_mixable(CFG, 1, 0, 1)
  for dense_layers in (-1, CFG.num_layers):
    with pytest.raises(ValueError, match=rf"dense_layers={dense_layers}"):
      check_mixable(CFG, 3, dense_layers, 1)
  for top_k in (0, 4):
    with pytest.raises(ValueError, match=rf"top_k={top_k}"):
      mixture_config(CFG, 3, top_k=top_k)
  with pytest.raises(ValueError, match=r"moe_num_experts=3 for 2 sources"):
    mix(PARAMS[:2], CFG, mixture_config(CFG, 3), shared=PARAMS[0])
