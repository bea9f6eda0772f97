"""Model-GLUE's weight similarity between models and its clustering of a zoo into families.

The similarity of two models is the mean, over the weight matrices of their mixers and
FFNs, of the mean per-column cosine similarity (the official code's
``F.cosine_similarity(W_a, W_b, dim=0)`` on torch ``[out, in]`` weights: for each input
feature, the cosine between the two models' vectors over the outputs), optionally of the
deltas to a base model. In jaxlab's ``[in..., out...]`` layout a column is one input
index of a `Linear` (or router) kernel, and of an expert stack ``[expert, in, out]`` one (expert,
input) pair.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.growth.trees import by_name
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.linear import Linear
from jaxlab.nn.moe import Experts, Router

PART = re.compile(r"blocks/\d+/(mixer|ffn)/")


def weight_matrices(config: ModelConfig) -> dict[str, int]:
  """``{parameter name: number of output axes}`` for the mixers' and FFNs' weight
  matrices (kernels of `Linear` layers and routers, expert stacks), from the model's own modules."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  out = {}
  for path, module in nnx.iter_modules(model):
    name = "/".join(map(str, path))
    if not PART.match(name + "/"):
      continue
    if isinstance(module, (Linear, Router)):
      out[f"{name}/kernel"] = module.kernel.get_value().ndim - getattr(module, "num_in", 1)
    elif isinstance(module, Experts):
      out.update({f"{name}/{w}": 1 for w in ("gate", "up", "down") if getattr(module, w) is not None})
  return out


def column_cosine(a: Float[Array, "..."], b: Float[Array, "..."], out_axes: int) -> Float[Array, ""]:
  """Mean over columns (all but the last ``out_axes`` axes) of ``cos(a_col, b_col)``."""
  a = a.astype(jnp.float32).reshape(-1, int(np.prod(a.shape[a.ndim - out_axes:])))
  b = b.astype(jnp.float32).reshape(a.shape)
  norms = jnp.maximum(jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1), 1e-12)
  return jnp.mean(jnp.sum(a * b, axis=1) / norms)


def similarity(a: nnx.State, b: nnx.State, config: ModelConfig, base: nnx.State | None = None) -> dict[str, float]:
  """``{"mixer": ..., "ffn": ..., "all": ...}``: mean per-column cosine similarity of the
  two models' weight matrices (of their deltas to ``base`` when given)."""
  a, b = by_name(a), by_name(b)
  base = None if base is None else by_name(base)
  scores: dict[str, list[float]] = {"mixer": [], "ffn": []}
  for name, out_axes in weight_matrices(config).items():
    x, y = a[name], b[name]
    if base is not None:
      x, y = x - base[name], y - base[name]
    scores[PART.match(name).group(1)].append(float(column_cosine(x, y, out_axes)))
  every = scores["mixer"] + scores["ffn"]
  return {part: float(np.mean(v)) if v else float("nan") for part, v in (*scores.items(), ("all", every))}


def similarity_matrix(states: Sequence[nnx.State], config: ModelConfig, base: nnx.State | None = None,
                      part: str = "all") -> np.ndarray:
  """``[n, n]`` similarities (``part``: all | mixer | ffn) between every pair of models."""
  n = len(states)
  out = np.eye(n)
  for i in range(n):
    for j in range(i + 1, n):
      out[i, j] = out[j, i] = similarity(states[i], states[j], config, base)[part]
  return out


def cluster(similarities: np.ndarray, threshold: float = 0.95) -> list[list[int]]:
  """Model-GLUE's families: in order, each model joins the first family whose first
  member it matches above ``threshold``, and opens a new family when it matches none
  (the official loop drops such a model, a bug)."""
  families: list[list[int]] = []
  for i in range(len(similarities)):
    for family in families:
      if similarities[family[0], i] > threshold:
        family.append(i)
        break
    else:
      families.append([i])
  return families
