"""Mixtures of dense models. FFN level: a mixture whose router always picks source i
computes the dense model made of the shared model with source i's MLPs (source i itself
when it is the shared one), in the hybrid variant too. Block and model levels: one that
always picks source i computes source i's blocks on the shared model's embeddings, head
and dense layers, for any architecture. `hidden_router`'s columns are the normalized
mean FFN inputs (or pooled layer inputs) of each source's data; configs that cannot be
mixed are refused by name."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import hidden_router, mix, mixture_config
from jaxlab.merging.mixture import check_mixable
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn import block_mixture

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


# ---- block and model levels -----------------------------------------------------------------
def dense_with_blocks_of(sources, shared: int, picked: int, layers) -> nnx.State:
  """Source ``shared``'s parameters with the blocks ``layers`` taken from source ``picked``."""
  other = flat(sources[picked])
  return with_values(sources[shared], {name: value for name, value in other.items()
                                       if name.startswith(tuple(f"blocks/{layer}/" for layer in layers))})


def always_picking(monkeypatch, picked: int) -> None:
  """Every sequence router sends every sequence to block ``picked`` with gate 1."""
  def route(self, x, positions, cached=None):
    return jnp.zeros((x.shape[0], self.config.block_experts)).at[:, picked].set(1.0)
  monkeypatch.setattr(block_mixture.SequenceRouter, "__call__", route)


MAMBA = ModelConfig(vocab_size=16, d_model=16, num_layers=3, mixers=("mamba", "attention"), ffns=("moe", "mlp"),
                    num_heads=2, mlp_dim=16, moe_num_experts=2, moe_top_k=1, ssm_state=4)


@pytest.mark.parametrize("config", [CFG, MAMBA], ids=["llama", "mamba_moe_hybrid"])
@pytest.mark.parametrize("level", ["block", "model"])
@pytest.mark.parametrize("dense_layers,shared,picked", [(0, 1, 1), (0, 0, 2), (1, 0, 2)])
def test_a_block_mixture_whose_router_always_picks_source_i_computes_source_i(monkeypatch, config, level,
                                                                              dense_layers, shared, picked):
  split = [nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...) for seed in (20, 21, 22)]
  graphdef, _, model_state = split[0]
  sources = [p for _, p, _ in split]
  target = mixture_config(config, 3, level=level, dense_layers=dense_layers)
  params = mix(sources, config, target, shared=sources[shared], seed=1)
  always_picking(monkeypatch, picked)
  graph, _, state = nnx.split(nnx.eval_shape(lambda: Transformer(target, rngs=nnx.Rngs(0))), nnx.Param, ...)
  mixture = nnx.merge(graph, params, jax.tree.map(jnp.zeros_like, state))
  expected = dense_with_blocks_of(sources, shared, picked, range(dense_layers, config.num_layers))
  if shared == picked:
    chex.assert_trees_all_equal(flat(expected), flat(sources[picked]))
  dense = nnx.merge(graphdef, expected, model_state)
  np.testing.assert_allclose(mixture(TOKENS), dense(TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["block", "model"])
def test_the_expert_blocks_are_the_sources_blocks_and_the_rest_is_the_shared_model(level):
  target = mixture_config(CFG, 3, level=level, dense_layers=1)
  routers = {layer: jnp.full((CFG.d_model, 3), float(layer + 1)) for layer in range(CFG.num_layers)}
  params = flat(mix(PARAMS, CFG, target, shared=PARAMS[1], routers=routers))
  sources, shared = [flat(p) for p in PARAMS], flat(PARAMS[1])
  router = params.pop("block_router/kernel" if level == "model" else "blocks/1/router/kernel")
  np.testing.assert_array_equal(router, routers[1])
  for name in [n for n in params if n.startswith("blocks/1/experts/")]:
    e, rest = name.split("/")[3], "/".join(name.split("/")[4:])
    np.testing.assert_array_equal(params.pop(name), sources[int(e)][f"blocks/1/{rest}"])
  assert sorted(params) == sorted(n for n in shared if not n.startswith("blocks/1/"))
  for name, value in params.items():
    np.testing.assert_array_equal(value, shared[name], err_msg=name)


@pytest.mark.parametrize("pooler", ["first_token", "mean"])
def test_block_hidden_router_columns_are_the_normalized_mean_pooled_layer_inputs(pooler):
  keys = jax.random.split(jax.random.key(8), 6)
  data = [[jax.random.randint(keys[2 * e + b], (3, 5), 0, CFG.vocab_size) for b in range(2)] for e in range(3)]
  routers = hidden_router(GRAPHDEF, PARAMS[2], MODEL_STATE, data, level="block", pooler=pooler)
  model = nnx.merge(GRAPHDEF, PARAMS[2], MODEL_STATE)
  for layer in range(CFG.num_layers):
    for e in range(3):
      pooled = []
      for tokens in data[e]:
        x, positions, _ = model.embeddings(tokens)
        for block in model.blocks[:layer]:
          x = block(x, positions)[0]
        pooled.append(np.asarray(x[:, 0] if pooler == "first_token" else x.mean(axis=1), np.float64))
      mean = np.concatenate(pooled).mean(axis=0)
      np.testing.assert_allclose(routers[layer][:, e], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)


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
  check_mixable(dataclasses.replace(CFG, mlp_bias=True, ffns=("moe",)), 3, 0, 1, level="block")
  with pytest.raises(ValueError, match=r"level='sequence'"):
    check_mixable(CFG, 3, 0, 1, level="sequence")
  with pytest.raises(ValueError, match=r"block mixtures already"):
    check_mixable(dataclasses.replace(CFG, block_experts=2), 3, 0, 1, level="block")
  with pytest.raises(ValueError, match=r"at least two source models; got 1"):
    check_mixable(CFG, 1, 0, 1)
  for dense_layers in (-1, CFG.num_layers):
    with pytest.raises(ValueError, match=rf"dense_layers={dense_layers}"):
      check_mixable(CFG, 3, dense_layers, 1)
  for top_k in (0, 4):
    with pytest.raises(ValueError, match=rf"top_k={top_k}"):
      mixture_config(CFG, 3, top_k=top_k)
  with pytest.raises(ValueError, match=r"the target mixes 3 experts, but 2 sources"):
    mix(PARAMS[:2], CFG, mixture_config(CFG, 3), shared=PARAMS[0])
