"""Greedy merging on one-vector models with a hand-made score ``-||θ - target||²``: the
coefficient kept is the grid's best (not the last tried), a candidate that lowers the
score is rejected, the history and members agree with what was merged, and without a
grid the result is the uniform average of the accepted models (the greedy soup)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.merging import greedy_merge
from jaxlab.merging.search import COEFFICIENTS


def model(*values) -> nnx.State:
  return nnx.State({"w": nnx.Param(jnp.asarray(values, jnp.float32))})


def vector(state: nnx.State) -> np.ndarray:
  return np.asarray(state["w"].get_value(), np.float64)


def scorer(target, calls=None):
  target = np.asarray(target, np.float64)

  def score(state):
    if calls is not None:
      calls.append(vector(state))
    return float(-np.sum((vector(state) - target) ** 2))
  return score


def test_the_grid_search_keeps_the_best_coefficient_and_rejects_what_lowers_the_score():
  target = [0.3, 0.0]
  states = [model(1.0, 0.0), model(5.0, 5.0), model(0.0, 0.0)]  # own scores -0.49, -47.09, -0.09
  merged, history, members = greedy_merge(states, scorer(target))
  # best first: model 2, then 1.0 - λ of model 0 on the first coordinate: λ = 0.7 reaches the target
  assert members == [2, 0]
  assert [step.candidate for step in history] == [0, 1]
  first, second = history
  assert list(first.tried) == list(COEFFICIENTS)
  for c, value in first.tried.items():
    np.testing.assert_allclose(value, -((1 - c) * 1.0 - 0.3) ** 2, atol=1e-6)
  assert first.coefficient == 0.7 and first.accepted  # the best of the grid, not its last (0.9)
  np.testing.assert_allclose(first.score, 0.0, atol=1e-6)
  # model 1 moves every mixture away from the target: rejected, the current model unchanged
  for c, value in second.tried.items():
    expected = c * np.array([0.3, 0.0]) + (1 - c) * np.array([5.0, 5.0])
    np.testing.assert_allclose(value, -np.sum((expected - target) ** 2), rtol=1e-5)
  assert second.coefficient == 0.9 and not second.accepted
  assert second.score < first.score
  np.testing.assert_allclose(vector(merged), [0.3, 0.0], atol=1e-6)


def test_a_candidate_that_ties_the_best_score_is_accepted():
  # three equal models: every mixture scores exactly the same, so each candidate is accepted (the score
  # did not drop) with the first of the equally good coefficients
  states = [model(0.0), model(0.0), model(0.0)]
  merged, history, members = greedy_merge(states, scorer([1.0]), coefficients=(0.2, 0.5))
  assert members == [0, 1, 2] and all(step.accepted for step in history)
  assert all(step.coefficient == 0.2 and step.score == -1.0 for step in history)
  np.testing.assert_array_equal(vector(merged), [0.0])


def test_the_order_and_precomputed_scores_are_used():
  calls = []
  states = [model(0.0), model(1.0), model(0.5)]
  merged, history, members = greedy_merge(states, scorer([0.4], calls), coefficients=(0.5,), order=[1, 2, 0],
                                          scores=[-0.16, -0.36, -0.01])
  assert len(calls) == 2  # one per candidate and coefficient: the given scores are not measured again
  assert [step.candidate for step in history] == [2, 0]
  # start from model 1 (score -0.36): 0.5 · 1 + 0.5 · 0.5 = 0.75 scores -0.1225, accepted; then
  # 0.5 · 0.75 + 0.5 · 0 = 0.375 scores -0.000625, accepted.
  assert members == [1, 2, 0]
  np.testing.assert_allclose(vector(merged), [0.375], atol=1e-6)


def test_without_a_grid_it_is_the_greedy_soup():
  states = [model(10.0, 10.0), model(-1.0, -1.0), model(0.5, 0.5), model(1.1, 1.1), model(1.5, 1.5)]
  merged, history, members = greedy_merge(states, scorer([0.0, 0.0]), coefficients=None)
  # by own score: 0.5, -1, 1.1, 1.5, 10. The running means 0.5 -> -0.25 (accept), (0.5 - 1 + 1.1) / 3 = 0.2
  # (accept), (0.6 + 1.5) / 4 = 0.525 (reject), (0.6 + 10) / 4 (reject).
  assert [step.candidate for step in history] == [1, 3, 4, 0]
  assert [step.accepted for step in history] == [True, True, False, False]
  assert members == [2, 1, 3]
  # the one coefficient tried is the current model's share k / (k + 1) of a uniform average
  assert [list(step.tried) for step in history] == [[1 / 2], [2 / 3], [3 / 4], [3 / 4]]
  np.testing.assert_allclose(vector(merged), np.mean([vector(states[i]) for i in members], axis=0), atol=1e-6)
  np.testing.assert_allclose(history[1].score, -2 * 0.2**2, atol=1e-6)


def test_with_slerp_the_coefficient_is_the_current_models_share():
  angle = 0.3 * np.pi / 2  # 30% of the way from (1, 0) to (0, 1) on the unit circle
  target = [np.cos(angle), np.sin(angle)]
  merged, history, members = greedy_merge([model(1.0, 0.0), model(0.0, 1.0)], scorer(target), method="slerp")
  assert members == [0, 1] and history[0].coefficient == 0.7
  np.testing.assert_allclose(vector(merged), target, atol=1e-6)
