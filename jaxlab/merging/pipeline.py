"""Model-GLUE's pipeline (Zhao et al. 2024, §4): cluster a zoo by weight similarity,
merge greedily within each cluster, then mix the clusters' merges as experts.

1. similarity between every pair of models (`clustering.similarity_matrix`, of the
   deltas to ``base`` when given) and families by ``threshold`` (`clustering.cluster`);
2. within each family, `search.greedy_merge` on the validation ``score``;
3. one family: its merge is the result; several: a mixture (`mixture.mix`, FFN, block or
   model ``level``) whose experts are the families' merges, the rest of the model from
   ``shared`` (the merge of all the families' merges by uniform averaging, or ``base``),
   routers from the hidden states of each family's data, and the first ``dense_layers``
   layers dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxlab.merging.clustering import cluster, similarity_matrix
from jaxlab.merging.methods import merge
from jaxlab.merging.mixture import hidden_router, mix, mixture_config
from jaxlab.merging.search import COEFFICIENTS, Score, greedy_merge
from jaxlab.nn import ModelConfig


@dataclasses.dataclass
class GlueResult:
  state: nnx.State
  config: ModelConfig  # the result's model: the zoo's, or the mixture's
  similarities: np.ndarray
  families: list[list[int]]
  members: list[list[int]]  # per family, the models its greedy merge kept
  coefficients: list[list[float]]


def model_glue(states: Sequence[nnx.State], config: ModelConfig, score: Score, *,
               graphdef: nnx.GraphDef, model_state: nnx.State,
               data: Callable[[Sequence[int]], Iterable[Any]] | None = None, base: nnx.State | None = None,
               threshold: float = 0.95, method: str = "linear", coefficients: Sequence[float] | None = COEFFICIENTS,
               level: str = "ffn", pooler: str = "first_token", dense_layers: int = 0, top_k: int = 1,
               shared: str = "average", seed: int = 0,
               scores: Sequence[float] | None = None, **options) -> GlueResult:
  """The pipeline on ``states`` (dense models of ``config``; ``graphdef`` and
  ``model_state`` make them runnable). ``data(models)`` gives token batches of those
  models' own data, for the routers; ``shared``: ``average`` or ``base``; ``seed``: DARE's
  masks and the routers' init without data; ``options``: the pairwise merge's."""
  scores = [score(s) for s in states] if scores is None else list(scores)
  sims = similarity_matrix(states, config, base)
  families = cluster(sims, threshold)
  merged, members, coefficients_kept = [], [], []
  for family in families:
    state, history, kept = greedy_merge([states[i] for i in family], score, coefficients=coefficients,
                                        method=method, base=base, scores=[scores[i] for i in family], seed=seed,
                                        **options)
    merged.append(state)
    members.append([family[i] for i in kept])
    coefficients_kept.append([step.coefficient for step in history if step.accepted])
  result = dict(similarities=sims, families=families, members=members, coefficients=coefficients_kept)
  if len(families) == 1:
    return GlueResult(state=merged[0], config=config, **result)
  if shared == "base" and base is None:
    raise ValueError("shared='base' takes the mixture's non-expert parameters from base=, which is None.")
  trunk = base if shared == "base" else merge(merged, "linear")
  target = mixture_config(config, len(merged), level=level, pooler=pooler, dense_layers=dense_layers, top_k=top_k)
  routers = None if data is None else hidden_router(graphdef, trunk, model_state, [data(f) for f in members],
                                                    level=level, pooler=pooler)
  state = mix(merged, config, target, shared=trunk, routers=routers, seed=seed)
  return GlueResult(state=state, config=target, **result)
