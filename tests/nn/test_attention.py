"""dot_product_attention against a direct implementation that repeats k and v."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxlab.nn import dot_product_attention
from jaxlab.nn.positional import rope


def naive_attention(q, k, v, mask):
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None], scores, -1e30)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", weights, v)


class AttentionTest(chex.TestCase, parameterized.TestCase):

  @parameterized.product(heads_kv=[(4, 4), (4, 2), (8, 1)], length=[1, 7, 33])
  def test_matches_naive_causal(self, heads_kv, length):
    h, kv = heads_kv
    keys = jax.random.split(jax.random.key(length * 10 + h), 3)
    q = jax.random.normal(keys[0], (2, length, h, 16))
    k = jax.random.normal(keys[1], (2, length, kv, 16))
    v = jax.random.normal(keys[2], (2, length, kv, 16))
    pos = jnp.arange(length)
    mask = jnp.broadcast_to(pos[:, None] >= pos[None, :], (2, length, length))
    chex.assert_trees_all_close(
        dot_product_attention(q, k, v, mask), naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5
    )

  def test_fully_masked_query_returns_zeros_and_finite_grads(self):
    q = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 4, 2, 8))
    mask = jnp.ones((1, 3, 4), bool).at[:, 1].set(False)
    out = dot_product_attention(q, k, v, mask)
    chex.assert_trees_all_close(out[:, 1], jnp.zeros_like(out[:, 1]))
    grads = jax.grad(lambda q, k, v: dot_product_attention(q, k, v, mask).sum(), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)


class RopeTest(chex.TestCase):

  def test_scores_depend_only_on_relative_position(self):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
      qm = rope(q, jnp.array([[m]]), 10_000.0)
      kn = rope(k, jnp.array([[n]]), 10_000.0)
      return float(jnp.sum(qm * kn))

    self.assertAlmostEqual(score(3, 1), score(103, 101), places=4)
    self.assertNotAlmostEqual(score(3, 1), score(3, 2), places=3)

  def test_position_zero_is_identity_and_norm_is_preserved(self):
    x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8))
    chex.assert_trees_all_close(rope(x, jnp.zeros((2, 5), jnp.int32), 500.0), x, atol=1e-6)
    rotated = rope(x, jnp.arange(10).reshape(2, 5), 500.0)
    chex.assert_trees_all_close(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), atol=1e-5)
