"""Merging models of one architecture into one, parameter by parameter.

`merge` is the one entry point; each method is a function of one parameter's values in
the models (``xs``, a list of arrays of one shape), the base model's value ``base`` (for
the methods built on task vectors ``τ_t = θ_t - θ_0``) and the per-model ``weights``.
Option names follow mergekit where it has the method (``t`` for SLERP, ``density`` for
the fraction TIES and DARE keep, ``seed`` for DARE's masks) and ``scale`` is the task
vectors' λ. Every method runs per parameter with ``jax.numpy`` only, so it runs under
``jax.jit`` on sharded states (each output sharded like its inputs), in float32 whatever
the inputs' dtype, and returns ``dtype`` (default: the inputs').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare", "dare_ties", "fisher", "regmean")
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "dare_ties")
Leaf = Float[Array, "..."]


def linear(xs: Sequence[Leaf], weights: Sequence[float]) -> Leaf:
  """Weight averaging / model soups (Wortsman et al., ICML 2022): ``θ = Σ_t w_t θ_t / Σ_t w_t``."""
  return sum(w * x for w, x in zip(weights, xs)) / sum(weights)


def slerp(a: Leaf, b: Leaf, t: float, *, colinear: float = 0.9995) -> Leaf:
  """Spherical interpolation (Shoemake 1985) of one parameter, as a flat vector:
  ``θ = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` with ``cos Ω = â·b̂``; linear
  interpolation where the two are (anti)parallel within ``colinear``."""
  dot = jnp.vdot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-12)
  omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  parallel = jnp.abs(dot) > colinear
  sin = jnp.where(parallel, 1.0, jnp.sin(omega))
  wa = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
  wb = jnp.where(parallel, t, jnp.sin(t * omega) / sin)
  return wa * a + wb * b


def task_arithmetic(xs: Sequence[Leaf], base: Leaf, weights: Sequence[float], scale: float) -> Leaf:
  """Task arithmetic (Ilharco et al., ICLR 2023): ``θ = θ_0 + λ Σ_t w_t τ_t``."""
  return base + scale * sum(w * (x - base) for w, x in zip(weights, xs))


def trim(tau: Leaf, density: float) -> Leaf:
  """TIES step 1: ``τ`` with all but its ``⌊density · size⌋`` largest magnitudes zeroed."""
  k = int(density * tau.size)
  flat = tau.reshape(-1)
  if k >= flat.size:
    return tau
  keep = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(jnp.abs(flat), k)[1]].set(True) if k else False
  return jnp.where(keep, flat, 0.0).reshape(tau.shape)


def disjoint_merge(taus: Sequence[Leaf], weights: Sequence[float]) -> Leaf:
  """TIES steps 2-3 (Yadav et al., NeurIPS 2023, Alg. 1): the elected sign
  ``γ = sgn(Σ_t w_t τ_t)``, then the weighted mean over the models that agree with it,
  ``τ_m = Σ_{t: sgn τ_t = γ} w_t τ_t / Σ_{t: sgn τ_t = γ} w_t`` (0 where none does)."""
  sign = jnp.sign(sum(w * tau for w, tau in zip(weights, taus)))
  agree = [(jnp.sign(tau) == sign) & (tau != 0) for tau in taus]
  total = sum(w * jnp.where(a, tau, 0.0) for w, a, tau in zip(weights, agree, taus))
  count = sum(w * a for w, a in zip(weights, agree))
  return jnp.where(count != 0, total / jnp.where(count != 0, count, 1.0), 0.0)


def ties(xs: Sequence[Leaf], base: Leaf, weights: Sequence[float], density: float, scale: float) -> Leaf:
  """TIES-merging: trim each task vector to ``density``, elect signs, disjoint mean;
  ``θ = θ_0 + λ τ_m``."""
  return base + scale * disjoint_merge([trim(x - base, density) for x in xs], weights)


def drop_and_rescale(tau: Leaf, density: float, key: jax.Array) -> Leaf:
  """DARE (Yu et al., ICML 2024, eq. 2): ``τ̃ = m ⊙ τ / (1 - p)``, ``m ~ Bernoulli(1 - p)``,
  with keep rate ``1 - p = density``, so that ``E[τ̃] = τ``."""
  keep = jax.random.bernoulli(key, density, tau.shape)
  return jnp.where(keep, tau / density, 0.0)


def dare(xs: Sequence[Leaf], base: Leaf, weights: Sequence[float], density: float, scale: float,
         key: jax.Array, *, sign_consensus: bool) -> Leaf:
  """DARE on each task vector, then task arithmetic (mergekit's ``dare_linear``) or,
  with ``sign_consensus``, TIES' sign election and disjoint mean (``dare_ties``)."""
  taus = [drop_and_rescale(x - base, density, jax.random.fold_in(key, t)) for t, x in enumerate(xs)]
  if sign_consensus:
    return base + scale * disjoint_merge(taus, weights)
  return base + scale * sum(w * tau for w, tau in zip(weights, taus))


def fisher(xs: Sequence[Leaf], fishers: Sequence[Leaf], weights: Sequence[float], floor: float) -> Leaf:
  """Fisher merging (Matena & Raffel, NeurIPS 2022, eq. 3):
  ``θ = Σ_t w_t F_t θ_t / Σ_t w_t F_t`` with diagonal Fishers floored at ``floor``."""
  fs = [w * jnp.maximum(f, floor) for w, f in zip(weights, fishers)]
  return sum(f * x for f, x in zip(fs, xs)) / sum(fs)


def regmean(kernels: Sequence[Leaf], grams: Sequence[Float[Array, "i i"]], weights: Sequence[float],
            alpha: float) -> Leaf:
  """RegMean (Jin et al., ICLR 2023, eq. 2) for a linear layer ``y = x W``:
  ``W = (Σ_t G̃_t)^{-1} Σ_t G̃_t W_t``, ``G_t = X_tᵀ X_t`` the Gram of model t's inputs to
  the layer and ``G̃ = α G + (1 - α) diag(G)`` (the paper's shrinking of off-diagonal
  terms). The kernel's leading axes are its inputs, as `jaxlab.nn.linear.Linear` lays them out."""
  shape, n_in = kernels[0].shape, grams[0].shape[0]
  shrunk = [w * (alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g))) for w, g in zip(weights, grams)]
  # Solved for the correction to the weighted mean W̄ (the same W, as (Σ G̃)^{-1} Σ G̃ W̄ = W̄):
  # float32's error then scales with the models' differences, not their weights, and
  # directions the data hardly spans keep W̄.
  mean = (sum(w * k for w, k in zip(weights, kernels)) / sum(weights)).reshape(n_in, -1)
  rhs = sum(jnp.matmul(g, k.reshape(n_in, -1) - mean, precision="highest") for g, k in zip(shrunk, kernels))
  gram = sum(shrunk)
  scale = jnp.sqrt(jnp.maximum(jnp.diag(gram), 1e-30))  # Jacobi scaling: LM inputs span many magnitudes
  solved = jnp.linalg.solve(gram / (scale[:, None] * scale[None, :]), rhs / scale[:, None])
  return (mean + solved / scale[:, None]).reshape(shape)


# ---- the entry point ----------------------------------------------------------------------
def _name(path: tuple) -> str:
  return "/".join(map(str, path))


def check_same_structure(trees: Sequence[nnx.State], labels: Sequence[str]) -> list[list[tuple]]:
  """The trees' flat (path, variable) lists; raises naming (by ``labels``) the first tree
  whose paths or shapes differ from the first one's."""
  flats = [nnx.to_flat_state(s) for s in trees]
  names = [[_name(p) for p, _ in f] for f in flats]
  for i, other in enumerate(names[1:], 1):
    if other != names[0]:
      missing = sorted(set(names[0]) ^ set(other))
      raise ValueError(f"{labels[i]} has other parameters than {labels[0]} ({missing[:3]} ...): merging needs "
                       f"models of one architecture.")
    for (path, a), (_, b) in zip(flats[0], flats[i]):
      if a.get_value().shape != b.get_value().shape:
        raise ValueError(f"{labels[i]} {_name(path)} has shape {b.get_value().shape}, {labels[0]} "
                         f"{a.get_value().shape}: merging needs models of one width.")
  return flats


def _per_model(name: str, values: Any, count: int) -> list[float]:
  values = [1.0] * count if values is None else [float(v) for v in values]
  if len(values) != count:
    raise ValueError(f"{name} has {len(values)} entries for {count} models.")
  return values


def merge(states: Sequence[nnx.State], method: str = "linear", base: nnx.State | None = None,
          weights: Sequence[float] | None = None, *, dtype: Any = None, t: float = 0.5,
          scale: float = 1.0, density: float | None = None, seed: int = 0,
          fishers: Sequence[nnx.State] | None = None, fisher_floor: float = 1e-6,
          grams: Sequence[dict[str, jax.Array]] | None = None, alpha: float = 0.9) -> nnx.State:
  """``states`` (parameter trees of one architecture) merged into one by ``method``:

  - ``linear``: weighted average (uniform soup with no ``weights``);
  - ``slerp``: two models, interpolated by ``t`` (0 gives the first);
  - ``task_arithmetic``: ``base + scale · Σ w_t τ_t``;
  - ``ties``: trim to ``density`` (default 0.2, the paper's k = 20%), elect sign, disjoint mean, ``· scale``;
  - ``dare`` / ``dare_ties``: drop with keep rate ``density`` (default 0.1, the paper's p = 0.9) and
    rescale, masks from ``seed``; then task arithmetic / TIES' disjoint merge;
  - ``fisher``: ``fishers`` (one diagonal Fisher per model, `statistics.diagonal_fisher`);
  - ``regmean``: ``grams`` (per model, ``{kernel name: Gram}`` from `statistics.input_grams`)
    for the linear layers, ``alpha`` the off-diagonal shrinkage; the other parameters
    (norms, embeddings, convolutions, experts) are averaged by ``weights``.

  ``weights`` default to 1 per model. Non-float variables come from the first model."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: choose one of {METHODS}")
  if not states:
    raise ValueError("merge needs at least one model.")
  if method in NEEDS_BASE and base is None:
    raise ValueError(f"method={method!r} merges task vectors θ_t - θ_0: pass base= (the model they were "
                     f"fine-tuned from).")
  if method == "slerp" and len(states) != 2:
    raise ValueError(f"slerp interpolates two models; got {len(states)}. Merge pairwise (greedy_merge) for more.")
  if method == "fisher" and (fishers is None or len(fishers) != len(states)):
    raise ValueError("method='fisher' needs fishers=, one diagonal Fisher tree per model "
                     "(jaxlab.merging.diagonal_fisher).")
  if method == "regmean" and (grams is None or len(grams) != len(states)):
    raise ValueError("method='regmean' needs grams=, one {kernel name: Gram} per model (jaxlab.merging.input_grams).")
  if density is None:
    density = 0.2 if method == "ties" else 0.1
  if method in ("ties", "dare", "dare_ties") and not 0.0 < density <= 1.0:
    raise ValueError(f"density={density}: the fraction of each task vector kept, in (0, 1].")
  weights = _per_model("weights", weights, len(states))
  labels = [f"states[{i}]" for i in range(len(states))] + ([] if base is None else ["base"])
  flats = check_same_structure([*states, *([] if base is None else [base])], labels)
  base_flat = flats[-1] if base is not None else None
  fisher_flats = None if method != "fisher" else check_same_structure(
      [states[0], *fishers], ["states[0]", *(f"fishers[{i}]" for i in range(len(fishers)))])[1:]
  key = jax.random.key(seed)

  def one(i: int, path: tuple, variables: list) -> jax.Array:
    name = _name(path)
    like = variables[0].get_value()
    if not jnp.issubdtype(like.dtype, jnp.floating):
      return like
    xs = [v.get_value().astype(jnp.float32) for v in variables]
    b = None if base_flat is None else base_flat[i][1].get_value().astype(jnp.float32)
    if method == "linear":
      out = linear(xs, weights)
    elif method == "slerp":
      out = slerp(xs[0], xs[1], t)
    elif method == "task_arithmetic":
      out = task_arithmetic(xs, b, weights, scale)
    elif method == "ties":
      out = ties(xs, b, weights, density, scale)
    elif method in ("dare", "dare_ties"):
      out = dare(xs, b, weights, density, scale, jax.random.fold_in(key, i), sign_consensus=method == "dare_ties")
    elif method == "fisher":
      out = fisher(xs, [f[i][1].get_value().astype(jnp.float32) for f in fisher_flats], weights, fisher_floor)
    elif name in grams[0]:
      out = regmean(xs, [g[name].astype(jnp.float32) for g in grams], weights, alpha)
    else:
      out = linear(xs, weights)
    return out.astype(dtype or like.dtype)

  merged = []
  for i, (path, _) in enumerate(flats[0]):
    variables = [flat[i][1] for flat in flats[:len(states)]]
    merged.append((path, variables[0].replace(one(i, path, variables))))
  return nnx.from_flat_state(merged)
