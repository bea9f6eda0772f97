"""The decode-path attention with explicit positions, and RoPE properties."""

import chex
import jax
import jax.numpy as jnp
from absl.testing import parameterized

from jaxlab.nn import cache_attention
from jaxlab.nn.positional import alibi_slopes, rope
from pallas_kernels.flash_attention.common import MaskParams
from pallas_kernels.flash_attention.reference import attention_reference


def explicit(causal=True, window=None, cap=None, alibi=False, scale=0.25):
  return MaskParams(q_offset=0, kv_len=2**30, causal=causal, sliding_window=window,
                    logit_soft_cap=cap, scale=scale, has_segments=True, has_alibi=alibi)


class CacheAttentionTest(chex.TestCase, parameterized.TestCase):

  @parameterized.product(heads_kv=[(4, 4), (4, 2), (8, 1)], window=[None, 5], alibi=[False, True])
  def test_matches_the_kernel_reference_on_contiguous_positions(self, heads_kv, window, alibi):
    h, kv = heads_kv
    keys = jax.random.split(jax.random.key(h * 10 + kv), 3)
    t, s, d = 6, 19, 16
    q = jax.random.normal(keys[0], (2, t, h, d))
    k = jax.random.normal(keys[1], (2, s, kv, d))
    v = jax.random.normal(keys[2], (2, s, kv, d))
    slopes = jnp.asarray(alibi_slopes(h)) if alibi else None
    q_pos = jnp.broadcast_to(jnp.arange(s - t, s), (2, t))
    got = cache_attention(q, k, v, q_pos, jnp.arange(s), jnp.ones(s, bool),
                          explicit(window=window, alibi=alibi), slopes)
    want = attention_reference(q, k, v, causal=True, sliding_window=window, scale=0.25,
                               alibi_slopes=slopes)
    chex.assert_trees_all_close(got, want, atol=1e-5)

  def test_slot_order_and_invalid_slots_do_not_matter(self):
    """A ring buffer stores positions out of order, with empty slots: same result."""
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (1, 1, 2, 8))
    k = jax.random.normal(keys[1], (1, 6, 2, 8))
    v = jax.random.normal(keys[2], (1, 6, 2, 8))
    q_pos = jnp.array([[5]])
    in_order = cache_attention(q, k, v, q_pos, jnp.arange(6), jnp.ones(6, bool), explicit(), None)
    perm = jnp.array([3, 0, 5, 1, 4, 2])
    junk_k = jnp.concatenate([k[:, perm], 100 * jnp.ones((1, 2, 2, 8))], axis=1)
    junk_v = jnp.concatenate([v[:, perm], 100 * jnp.ones((1, 2, 2, 8))], axis=1)
    pos = jnp.concatenate([perm, jnp.array([-1, -1])])
    shuffled = cache_attention(q, junk_k, junk_v, q_pos, pos, pos >= 0, explicit(), None)
    chex.assert_trees_all_close(in_order, shuffled, atol=1e-6)


class RopeTest(chex.TestCase):

  def test_scores_depend_only_on_relative_position(self):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n, **scaling):
      qm = rope(q, jnp.array([[m]]), 10_000.0, **scaling)
      kn = rope(k, jnp.array([[n]]), 10_000.0, **scaling)
      return float(jnp.sum(qm * kn))

    self.assertAlmostEqual(score(3, 1), score(103, 101), places=4)
    self.assertNotAlmostEqual(score(3, 1), score(3, 2), places=3)
    # linear scaling by 4 is the same as dividing positions by 4
    self.assertAlmostEqual(score(8, 4, scaling="linear", factor=4.0), score(2, 1), places=4)
    # NTK scaling raises the base: long-range angles shrink, the score changes
    self.assertNotAlmostEqual(score(300, 0, scaling="ntk", factor=8.0), score(300, 0), places=3)

  def test_position_zero_is_identity_and_norm_is_preserved(self):
    x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8))
    chex.assert_trees_all_close(rope(x, jnp.zeros((2, 5), jnp.int32), 500.0), x, atol=1e-6)
    rotated = rope(x, jnp.arange(10).reshape(2, 5), 500.0)
    chex.assert_trees_all_close(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), atol=1e-5)


def test_alibi_slopes_match_the_paper():
  chex.assert_trees_all_close(alibi_slopes(8), jnp.array([2.0 ** -i for i in range(1, 9)]))
  # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence
  expected = [2.0 ** -i for i in range(1, 9)] + [2.0 ** (-(2 * i + 1) / 2) for i in range(4)]
  chex.assert_trees_all_close(alibi_slopes(12), jnp.array(expected), atol=1e-7)
