"""Greedy merging with a validation metric: greedy model soups and Model-GLUE's
heuristic merge with a coefficient search.

Model-GLUE (`heuristic_merge.py`) orders the candidates by their own score, then merges
them one at a time into the current model as ``λ · current + (1 - λ) · candidate`` and
keeps a merge only if the score does not drop. With a coefficient grid it keeps the λ
that scores best (the official code saves the last λ it tried instead, a bug); without
one λ = (k+1)/(k+2) after k accepted candidates, so the current model is the uniform
average of what it has accepted: the greedy soup of Wortsman et al. (ICML 2022, Alg. 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from jaxlab.merging.methods import merge

Score = Callable[[nnx.State], float]  # higher is better (an accuracy, or minus a loss)
COEFFICIENTS = tuple(i / 10 for i in range(1, 10))  # Model-GLUE's grid


@dataclasses.dataclass
class Step:
  """One candidate's round: the coefficients tried with their scores, the one kept, accepted or not."""

  candidate: int
  tried: dict[float, float]
  coefficient: float
  score: float
  accepted: bool


def _pairwise(current: nnx.State, candidate: nnx.State, coefficient: float, method: str, base: nnx.State | None,
              options: dict[str, Any]) -> nnx.State:
  if method == "slerp":  # t is the candidate's share
    return merge([current, candidate], "slerp", t=1.0 - coefficient, **options)
  return merge([current, candidate], method, base, weights=[coefficient, 1.0 - coefficient], **options)


def greedy_merge(states: Sequence[nnx.State], score: Score, *, coefficients: Sequence[float] | None = COEFFICIENTS,
                 method: str = "linear", base: nnx.State | None = None, order: Sequence[int] | None = None,
                 scores: Sequence[float] | None = None, **options) -> tuple[nnx.State, list[Step], list[int]]:
  """The greedy merge of ``states`` and its history: (merged state, one `Step` per
  candidate, the indices merged in). ``order`` defaults to the models by their own score,
  best first (``scores`` if already measured); ``coefficients=None`` is the greedy soup.
  ``method`` is any pairwise `merge` method with its ``options`` (``linear``, ``slerp``,
  ``ties``, ``dare_ties`` with ``base`` ...)."""
  if scores is None:
    scores = [score(s) for s in states]
  if order is None:
    order = sorted(range(len(states)), key=lambda i: -scores[i])
  current, best = states[order[0]], scores[order[0]]
  history, members = [], [order[0]]
  for candidate in order[1:]:
    grid = coefficients or [len(members) / (len(members) + 1)]
    tried = {}
    for c in grid:
      tried[c] = score(_pairwise(current, states[candidate], c, method, base, options))
    coefficient = max(tried, key=tried.get)
    accepted = tried[coefficient] >= best
    history.append(Step(candidate, tried, coefficient, tried[coefficient], accepted))
    if accepted:
      current = _pairwise(current, states[candidate], coefficient, method, base, options)
      best = tried[coefficient]
      members.append(candidate)
  return current, history, members
