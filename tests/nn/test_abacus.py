"""Abacus digit-position embeddings (McLeish et al. 2024) with every positional encoding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.abacus import digit_indices
from jaxlab.nn.config import POSITIONAL
from jaxlab.nn.reports import capture_reports

# Digits are tokens 3-12 here, so that the digit range is not the vocabulary's start.
BASE = dict(vocab_size=17, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, abacus=True,
            abacus_digit_tokens=(3, 12), abacus_max_offset=20, abacus_max_digits=8)


def indices_by_loop(digits, carry):
  """The index of each digit in its number, by walking each row."""
  out = np.zeros(digits.shape, np.int64)
  for row in range(digits.shape[0]):
    run = int(carry[row])
    for i, digit in enumerate(digits[row]):
      run = run + 1 if digit else 0
      out[row, i] = run
  return out


def random_tokens(seed, shape, digit_share=0.7):
  """Mostly digits, so that runs of every length up to the sequence's occur."""
  rng = np.random.default_rng(seed)
  digits = rng.integers(3, 13, shape)
  others = rng.choice([0, 1, 2, 13, 14, 15, 16], shape)
  return np.where(rng.random(shape) < digit_share, digits, others).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_digit_indices_count_each_digit_within_its_number(seed):
  rng = np.random.default_rng(seed)
  digits = rng.random((5, 1 + 7 * seed + 6)) < 0.75
  carry = rng.integers(0, 12, 5) * (rng.random(5) < 0.6)  # runs longer than the sequence too
  got = np.asarray(digit_indices(jnp.asarray(digits), jnp.asarray(carry, jnp.int32)))
  np.testing.assert_array_equal(got, indices_by_loop(digits, carry))
  np.testing.assert_array_equal(np.asarray(digit_indices(jnp.asarray(digits))),
                                indices_by_loop(digits, np.zeros(5, np.int64)))
  # one token continuing a number longer than the call (decoding digit after digit)
  np.testing.assert_array_equal(np.asarray(digit_indices(jnp.ones((1, 1), bool), jnp.asarray([9]))), [[10]])


def abacus_part(model, tokens, rng=None):
  """The Abacus term of the model's embeddings (theirs minus the token embeddings); with
  ``rng``, of the Abacus module as a training step calls it."""
  if rng is None:
    return np.asarray(model.embeddings(tokens)[0] - model.embed(tokens))
  return np.asarray(capture_reports(model.abacus, tokens, rng=rng)[0][0])


def test_a_digit_gets_the_vector_of_its_index_in_its_number_and_others_get_index_0():
  """``7 3 + 4 1 5 =``: the digits get indices 1 2 . 1 2 3, '+' and '=' index 0; the same
  problem placed later in the sequence gets the same vectors (position-free)."""
  model = Transformer(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  table = np.asarray(model.abacus.table[...])
  plus, equals = 13, 14
  problem = [10, 6, plus, 7, 4, 8, equals]
  part = abacus_part(model, jnp.asarray([problem, [0, 0, 0, *problem[:4]]], jnp.int32))
  np.testing.assert_allclose(part[0], table[[1, 2, 0, 1, 2, 3, 0]], atol=1e-6)
  np.testing.assert_allclose(part[1, 3:], part[0, :4], atol=1e-6)


def test_training_shifts_every_digit_by_one_offset_drawn_up_to_the_maximum():
  """With a training key, digit index i reads row i + k for one k in [0, max_offset];
  non-digits stay at row 0; without a key (evaluation) k = 0."""
  model = Transformer(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  table = np.asarray(model.abacus.table[...])
  tokens = jnp.asarray([[3, 4, 5, 13, 6, 7, 14]], jnp.int32)
  np.testing.assert_allclose(abacus_part(model, tokens), table[[[1, 2, 3, 0, 1, 2, 0]]], atol=1e-6)
  offsets = set()
  for seed in range(200):
    part = abacus_part(model, tokens, rng=jax.random.key(seed))[0]
    k = int(np.argmin(np.abs(table - part[0]).sum(-1))) - 1
    np.testing.assert_allclose(part, table[[1 + k, 2 + k, 3 + k, 0, 1 + k, 2 + k, 0]], atol=1e-6)
    offsets.add(k)
  assert offsets == set(range(21)), sorted(offsets)


@pytest.mark.parametrize("positional", POSITIONAL)
def test_decode_equals_forward_with_numbers_across_the_cache(positional):
  """Prefill ends inside a number, then one token at a time: the cache carries the run."""
  overrides = dict(positional=positional, max_position=32)
  model = Transformer(ModelConfig(**BASE, **overrides), rngs=nnx.Rngs(1))
  t = jnp.asarray(random_tokens(3, (3, 14)))
  t = t.at[:, 4:9].set(jnp.asarray([3, 9, 12, 4, 5]))  # a number across the prefill's end
  full = model(t)
  cache = model.init_cache(3, 16)
  logits, cache = model.decode(t[:, :6], cache)
  steps = [logits]
  for i in range(6, 14):
    logits, cache = model.decode(t[:, i : i + 1], cache)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)
  without = Transformer(ModelConfig(**{**BASE, **overrides, "abacus": False}), rngs=nnx.Rngs(1))
  assert float(jnp.abs(without(t) - full).max()) > 1e-3


def test_bad_digit_tokens_name_the_field():
  with pytest.raises(ValueError, match=r"model.abacus_digit_tokens=\(3, 11\).*last = first \+ 9"):
    ModelConfig(**{**BASE, "abacus_digit_tokens": (3, 11)})
  with pytest.raises(ValueError, match=r"abacus_digit_tokens=\(10, 19\).*vocabulary of 17"):
    ModelConfig(**{**BASE, "abacus_digit_tokens": (10, 19)})
