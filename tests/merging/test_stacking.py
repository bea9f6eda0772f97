"""Depth up-scaling: stacking two 3-layer models with drop=1 gives first's layers 0-1 then
second's layers 1-2 and first's embeddings, norm and head; the stacked model runs and its
first layers compute what first's do; drops out of range and seams that break a hybrid
pattern are refused by name."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import stack, stacked_config
from jaxlab.nn import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=3, num_heads=2, mlp_dim=16)
TOKENS = jax.random.randint(jax.random.key(5), (2, 7), 0, CFG.vocab_size)


@functools.cache
def split(seed: int):
  return nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def flat(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def hidden_states(graphdef, params, model_state, tokens):
  """The logits and the blocks' inputs and outputs (the embeddings, then each layer's output)."""
  model = nnx.merge(graphdef, params, model_state)
  logits, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
  return logits, captured["hidden_states"].get_value()[0]


def test_stack_takes_the_first_models_lower_and_the_second_models_upper_layers():
  (_, first, _), (_, second, _) = split(0), split(1)
  params, target = stack(first, second, CFG, drop=1)
  assert target == dataclasses.replace(CFG, num_layers=4)
  got, a, b = flat(params), flat(first), flat(second)
  sources = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2)}
  for name, value in got.items():
    if name.startswith("blocks/"):
      layer, rest = name.split("/", 2)[1:]
      source, index = sources[int(layer)]
      np.testing.assert_array_equal(value, source[f"blocks/{index}/{rest}"], err_msg=name)
    else:  # embeddings, final norm, head
      np.testing.assert_array_equal(value, a[name], err_msg=name)
  assert {name.split("/")[1] for name in got if name.startswith("blocks/")} == {"0", "1", "2", "3"}
  assert len(got) == len(a) + 9  # one more layer of 9 parameters


def test_the_stacked_model_runs_and_its_lower_layers_compute_the_first_models():
  graphdef, first, model_state = split(0)
  params, target = stack(first, split(1)[1], CFG, drop=1)
  stacked_graphdef, _, stacked_state = nnx.split(nnx.eval_shape(lambda: Transformer(target, rngs=nnx.Rngs(0))),
                                                 nnx.Param, ...)
  logits, hidden = jax.jit(functools.partial(hidden_states, stacked_graphdef))(params, stacked_state, TOKENS)
  assert logits.shape == (*TOKENS.shape, CFG.vocab_size) and np.all(np.isfinite(logits))
  assert len(hidden) == 5
  _, first_hidden = jax.jit(functools.partial(hidden_states, graphdef))(first, model_state, TOKENS)
  for i in range(3):  # the embeddings and the outputs of layers 0 and 1
    np.testing.assert_allclose(hidden[i], first_hidden[i], atol=1e-6, rtol=1e-6)


def test_drops_out_of_range_are_refused():
  for drop in (-1, CFG.num_layers):
    with pytest.raises(ValueError, match=rf"drop={drop}: remove between 0 and 2 of the 3 layers"):
      stacked_config(CFG, drop)
  (_, first, _), (_, second, _) = split(0), split(1)
  with pytest.raises(ValueError, match=r"drop=3"):
    stack(first, second, CFG, drop=3)


def test_a_seam_that_breaks_a_hybrid_pattern_is_refused():
  hybrid = dataclasses.replace(CFG, mixers=("attention", "gla"))
  # 3 layers, drop 1: layers 0, 1 then 1, 2; layer 1 (gla) lands at layer 2, where the pattern has attention
  with pytest.raises(ValueError, match=r"stacking puts layer 1 at layer 2.*\('attention', 'mlp'\)"):
    stacked_config(hybrid, 1)
  # 4 layers, drop 1: layers 0, 1, 2 then 1, 2, 3, which keeps the alternation (4 - 2 · 1 is a whole period)
  target = stacked_config(dataclasses.replace(hybrid, num_layers=4), 1)
  assert target.num_layers == 6
  assert [target.mixer_of(i) for i in range(6)] == ["attention", "gla"] * 3
