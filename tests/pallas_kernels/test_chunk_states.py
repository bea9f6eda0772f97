"""The inter-chunk state-passing kernel (interpret mode) against the recurrence written
as a Python loop, forward and reverse, with per-chunk and per-column decays."""

import numpy as np
import pytest

from pallas_kernels.chunk_states import states_entering_chunks


def loop(decay, added, initial, reverse):
  chunks = added.shape[2]
  order = range(chunks - 1, -1, -1) if reverse else range(chunks)
  S, entering = initial, [None] * chunks
  for c in order:
    entering[c] = S
    S = decay[:, :, c, None, :] * S + added[:, :, c]
  return np.stack(entering, axis=2), S


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("decay_cols", [1, 32], ids=["per_chunk", "per_column"])
def test_matches_the_recurrence(reverse, decay_cols):
  rng = np.random.default_rng(7 + decay_cols + reverse)
  b, h, chunks, rows, cols = 2, 3, 5, 32, 32  # 5 chunks: not a power of two
  decay = rng.uniform(0.3, 1.0, (b, h, chunks, decay_cols)).astype(np.float32)
  added = rng.normal(size=(b, h, chunks, rows, cols)).astype(np.float32)
  initial = rng.normal(size=(b, h, rows, cols)).astype(np.float32)
  entering, final = states_entering_chunks(decay, added, initial, reverse=reverse, interpret=True)
  want_entering, want_final = loop(decay, added, initial, reverse)
  np.testing.assert_allclose(np.asarray(entering), want_entering, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(final), want_final, rtol=1e-5, atol=1e-5)
