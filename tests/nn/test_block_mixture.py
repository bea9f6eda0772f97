"""Block mixtures (Model-GLUE's block and model levels): the forward equals the formula
y = Σ_{e ∈ top-k} w_e · block_e(x) with the gates of softmax(pool(x) W) renormalized over
the chosen, routed per sequence, written here in numpy with a loop over sequences; the
router learns through the gates when k > 1; decoding equals the forward; a mean-pooled
mixture is refused a cache; bad configs are refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.block_mixture import BlockMixture

CFG = ModelConfig(vocab_size=48, d_model=24, num_layers=3, num_heads=2, mlp_dim=40, block_experts=3,
                  block_dense_layers=1, block_top_k=2, init_std=0.2)


def routes_by_formula(x: np.ndarray, kernel: np.ndarray, pooler: str, k: int) -> np.ndarray:
  """[b, e] gates: softmax over all experts of the pooled state, top k renormalized, the rest 0."""
  pooled = x[:, 0] if pooler == "first_token" else x.mean(axis=1)
  logits = pooled.astype(np.float64) @ kernel.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gates = np.zeros_like(probs)
  for b in range(len(probs)):
    top = np.argsort(-probs[b])[:k]
    gates[b, top] = probs[b, top] / probs[b, top].sum()
  return gates


def logits_by_formula(model: Transformer, tokens: jax.Array) -> np.ndarray:
  c = model.config
  x, positions, _ = model.embeddings(tokens)
  routes = None
  for layer, block in enumerate(model.blocks):
    if layer < c.block_dense_layers:
      x = block(x, positions)[0]
      continue
    if c.block_router == "layer" or routes is None:
      router = block.router if c.block_router == "layer" else model.block_router
      routes = routes_by_formula(np.asarray(x), np.asarray(router.kernel[...]), c.block_pooler, c.block_top_k)
    out = np.zeros(x.shape, np.float64)
    for b in range(x.shape[0]):
      for e, expert in enumerate(block.experts):
        if routes[b, e]:
          out[b] += routes[b, e] * np.asarray(expert(x[b:b + 1], positions[b:b + 1])[0][0], np.float64)
    x = jnp.asarray(out, jnp.float32)
  return np.asarray(model._logits(x))


@pytest.mark.parametrize("router", ["layer", "model"])
@pytest.mark.parametrize("pooler", ["first_token", "mean"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_forward_is_the_gate_weighted_sum_of_the_chosen_blocks(router, pooler, top_k):
  config = dataclasses.replace(CFG, block_router=router, block_pooler=pooler, block_top_k=top_k)
  model = Transformer(config, rngs=nnx.Rngs(np.random.randint(1 << 30)))
  assert [isinstance(block, BlockMixture) for block in model.blocks] == [False, True, True]
  assert (model.block_router is None) == (router == "layer")
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (5, 7), 0, config.vocab_size)
  np.testing.assert_allclose(model(tokens), logits_by_formula(model, tokens), atol=2e-5, rtol=2e-5)


def test_sequences_take_different_blocks_so_the_test_above_can_see_the_routing():
  model = Transformer(dataclasses.replace(CFG, block_top_k=1), rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(4), (16, 5), 0, CFG.vocab_size)
  x, positions, _ = model.embeddings(tokens)
  x = model.blocks[0](x, positions)[0]
  chosen = np.argmax(np.asarray(model.blocks[1].router(x, positions)), axis=-1)
  assert len(set(chosen.tolist())) > 1


def test_with_top_2_the_router_learns_from_the_loss():
  model = Transformer(dataclasses.replace(CFG, block_router="model"), rngs=nnx.Rngs(5))
  tokens = jax.random.randint(jax.random.key(6), (4, 6), 0, CFG.vocab_size)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

  grads = jax.grad(loss)(params)
  assert float(jnp.max(jnp.abs(grads["block_router"]["kernel"][...]))) > 1e-6


@pytest.mark.parametrize("router", ["layer", "model"])
def test_decoding_in_pieces_equals_the_forward(router):
  model = Transformer(dataclasses.replace(CFG, block_router=router), rngs=nnx.Rngs(8))
  tokens = jax.random.randint(jax.random.key(9), (3, 9), 0, CFG.vocab_size)
  cache = model.init_cache(3, 12)
  pieces = []
  for start, stop in ((0, 4), (4, 5), (5, 9)):
    logits, cache = model.decode(tokens[:, start:stop], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(tokens), atol=1e-5, rtol=1e-5)


def test_a_mean_pooled_mixture_cannot_decode():
  model = Transformer(dataclasses.replace(CFG, block_pooler="mean"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"block_pooler='mean'.*first_token"):
    model.init_cache(1, 8)


@pytest.mark.parametrize("fields, message", [
    (dict(block_experts=1), r"block_experts=1: a block mixture needs at least 2"),
    (dict(block_top_k=4), r"block_top_k=4: choose between 1 and model.block_experts=3"),
    (dict(block_dense_layers=3), r"block_dense_layers=3"),
    (dict(block_router="token"), r"block_router"),
    (dict(block_pooler="last"), r"block_pooler"),
    (dict(positional="tape"), r"neither TAPE"),
])
def test_bad_block_mixture_configs_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **fields)
