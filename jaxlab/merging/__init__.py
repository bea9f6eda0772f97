"""Model merging and model mixture (Model-GLUE): from a zoo of models of one
architecture, one model: merged (`merge`), searched greedily (`greedy_merge`), mixed as
experts (`mix`), stacked in depth (`stack`), or all of it (`model_glue`)."""

from jaxlab.merging.clustering import cluster, similarity, similarity_matrix
from jaxlab.merging.methods import METHODS, merge
from jaxlab.merging.mixture import LEVELS, hidden_router, mix, mixture_config
from jaxlab.merging.pipeline import GlueResult, model_glue
from jaxlab.merging.search import greedy_merge
from jaxlab.merging.stacking import stack, stacked_config
from jaxlab.merging.statistics import diagonal_fisher, input_grams

__all__ = ["LEVELS", "METHODS", "GlueResult", "cluster", "diagonal_fisher", "greedy_merge", "hidden_router",
           "input_grams", "merge", "mix", "mixture_config", "model_glue", "similarity", "similarity_matrix", "stack",
           "stacked_config"]
