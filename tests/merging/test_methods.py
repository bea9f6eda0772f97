"""Merging methods: merging a model with itself gives the model for every method, and each
method computes its paper's formula (weight averaging, SLERP, task arithmetic, TIES,
DARE, Fisher merging, RegMean) on hand-made trees, recomputed here with numpy; the entry
point refuses what it cannot merge by name, merges in float32 whatever the inputs'
dtype, and runs under jit."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import METHODS, input_grams, merge
from jaxlab.nn import ModelConfig, Transformer

# mlp_dim = vocab_size = d_model: few distinct parameter shapes, so that few merge kernels compile
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=16)
TOKENS = jax.random.randint(jax.random.key(0), (4, 16), 0, CFG.vocab_size)


@functools.cache
def split(seed: int, config: ModelConfig = CFG):
  return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def params(seed: int, config: ModelConfig = CFG) -> nnx.State:
  return split(seed, config)[1]


def abstract_params(config: ModelConfig) -> nnx.State:
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]


def tree(**leaves) -> nnx.State:
  """A parameter tree of float32 leaves; a dict value is a sub-tree."""
  def build(value):
    if isinstance(value, dict):
      return {k: build(v) for k, v in value.items()}
    return nnx.Param(jnp.asarray(value, jnp.float32))
  return nnx.State({k: build(v) for k, v in leaves.items()})


def flat(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assert_same(a: nnx.State, b: nnx.State, atol: float = 1e-6):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].dtype == fb[name].dtype, name
    np.testing.assert_allclose(fa[name], fb[name], atol=atol, rtol=0, err_msg=name)


# ---- numpy references ---------------------------------------------------------------------
def np_trim(tau: np.ndarray, density: float) -> np.ndarray:
  k = int(density * tau.size)
  out = np.zeros(tau.size)
  keep = np.argsort(-np.abs(tau.ravel()), kind="stable")[:k]
  out[keep] = tau.ravel()[keep]
  return out.reshape(tau.shape)


def np_disjoint_mean(taus, weights) -> np.ndarray:
  elected = np.sign(sum(w * t for w, t in zip(weights, taus)))
  out = np.zeros(taus[0].shape)
  for idx in np.ndindex(out.shape):
    agreeing = [(w, t[idx]) for w, t in zip(weights, taus) if t[idx] != 0 and np.sign(t[idx]) == elected[idx]]
    if agreeing:
      out[idx] = sum(w * v for w, v in agreeing) / sum(w for w, _ in agreeing)
  return out


def np_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
  a, b = a.astype(np.float64), b.astype(np.float64)
  omega = np.arccos(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


def angle(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.arccos(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))))


# ---- merging a model with itself ------------------------------------------------------------
def _grams(seed: int, tokens) -> list[dict]:
  """Two models' Grams: model ``seed``'s on ``tokens`` and a rescaled, shifted copy (each input_grams
  call compiles once)."""
  graphdef, p, model_state = split(seed)
  grams = input_grams(graphdef, p, model_state, [{"inputs": tokens}])
  return [grams, {k: 3.0 * g + jnp.eye(g.shape[0]) for k, g in grams.items()}]


def _fishers(m: nnx.State, seed: int) -> nnx.State:
  leaves, treedef = jax.tree.flatten(m)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jnp.abs(jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])


# (id, method, keyword arguments of merge besides the states) given the model m and another model o
SELF_MERGES = [
    ("linear", "linear", lambda m, o: dict(states=[m, m, m], weights=[1.0, 2.0, 0.5])),
    ("slerp", "slerp", lambda m, o: dict(states=[m, m], t=0.3)),
    ("task_arithmetic_base_self", "task_arithmetic", lambda m, o: dict(states=[m, m], base=m, scale=0.7)),
    ("task_arithmetic_base_other", "task_arithmetic", lambda m, o: dict(states=[m], base=o)),
    ("ties_base_self", "ties", lambda m, o: dict(states=[m], base=m, density=0.3)),
    ("ties_base_other_dense", "ties", lambda m, o: dict(states=[m], base=o, density=1.0)),
    ("dare_base_self", "dare", lambda m, o: dict(states=[m], base=m, density=0.3)),
    ("dare_base_other_dense", "dare", lambda m, o: dict(states=[m], base=o, density=1.0)),
    ("dare_ties_base_self", "dare_ties", lambda m, o: dict(states=[m, m], base=m, density=0.3)),
    ("dare_ties_base_other_dense", "dare_ties", lambda m, o: dict(states=[m, m], base=o, density=1.0)),
    ("fisher", "fisher", lambda m, o: dict(states=[m, m], fishers=[_fishers(m, 1), _fishers(m, 2)], weights=[1, 3])),
    ("regmean", "regmean", lambda m, o: dict(states=[m, m], grams=_grams(0, TOKENS), weights=[1.0, 2.0])),
]


def test_the_self_merges_cover_every_method():
  assert {method for _, method, _ in SELF_MERGES} == set(METHODS)


@pytest.mark.parametrize("method,arguments", [case[1:] for case in SELF_MERGES], ids=[case[0] for case in SELF_MERGES])
def test_merging_a_model_with_itself_gives_the_model(method, arguments):
  m, other = params(0), params(1)
  kwargs = arguments(m, other)
  assert_same(merge(kwargs.pop("states"), method, **kwargs), m, atol=1e-6)


def test_task_arithmetic_with_scale_zero_is_the_base():
  base = params(0)
  assert_same(merge([params(1), params(2)], "task_arithmetic", base=base, scale=0.0), base, atol=0)


def test_task_arithmetic_adds_the_weighted_task_vectors():
  base, x, y = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.0, 0.5]), np.array([0.0, -1.0, 3.0])
  out = merge([tree(w=x), tree(w=y)], "task_arithmetic", base=tree(w=base), weights=[0.5, 2.0], scale=0.3)
  np.testing.assert_allclose(flat(out)["w"], base + 0.3 * (0.5 * (x - base) + 2.0 * (y - base)), rtol=1e-6)


# ---- linear ---------------------------------------------------------------------------------
def test_linear_is_the_weighted_average_normalized_by_the_weights():
  rng = np.random.default_rng(0)
  xs = [dict(a=rng.normal(size=3), b=dict(c=rng.normal(size=(2, 2)))) for _ in range(3)]
  weights = [1.0, 3.0, 0.5]
  out = flat(merge([tree(**x) for x in xs], "linear", weights=weights))
  total = sum(weights)
  np.testing.assert_allclose(out["a"], sum(w * x["a"] for w, x in zip(weights, xs)) / total, rtol=1e-6)
  np.testing.assert_allclose(out["b/c"], sum(w * x["b"]["c"] for w, x in zip(weights, xs)) / total, rtol=1e-6)
  uniform = flat(merge([tree(**x) for x in xs]))  # the default: the uniform soup
  np.testing.assert_allclose(uniform["a"], np.mean([x["a"] for x in xs], axis=0), rtol=1e-6)


def test_non_float_variables_come_from_the_first_model():
  a = nnx.State({"w": nnx.Param(jnp.ones(2)), "step": nnx.Variable(jnp.array(3, jnp.int32))})
  b = nnx.State({"w": nnx.Param(jnp.full(2, 3.0)), "step": nnx.Variable(jnp.array(5, jnp.int32))})
  out = merge([a, b])
  assert int(out["step"].get_value()) == 3
  np.testing.assert_allclose(out["w"].get_value(), [2.0, 2.0])


# ---- slerp ----------------------------------------------------------------------------------
def test_slerp_ends_are_the_two_models():
  a, b = params(0), params(1)
  assert_same(merge([a, b], "slerp", t=0.0), a, atol=1e-6)
  assert_same(merge([a, b], "slerp", t=1.0), b, atol=1e-6)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle():
  a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
  out = flat(merge([tree(w=a), tree(w=b)], "slerp", t=0.5))["w"]
  np.testing.assert_allclose(out, [np.sqrt(0.5), np.sqrt(0.5), 0.0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out), 1.0, atol=1e-6)
  np.testing.assert_allclose(angle(out, a), angle(out, b), atol=1e-6)
  np.testing.assert_allclose(angle(out, a), np.pi / 4, atol=1e-6)


def test_slerp_matches_the_formula_per_parameter():
  rng = np.random.default_rng(1)
  a = dict(u=rng.normal(size=(3, 4)), v=rng.normal(size=5))
  b = dict(u=rng.normal(size=(3, 4)) * 2.0, v=rng.normal(size=5) * 0.5)
  out = flat(merge([tree(**a), tree(**b)], "slerp", t=0.3))
  for name in ("u", "v"):  # each parameter with its own angle
    np.testing.assert_allclose(out[name], np_slerp(a[name], b[name], 0.3), rtol=1e-5, atol=1e-6)


def test_slerp_of_colinear_vectors_is_linear_interpolation():
  a = np.array([1.0, -2.0, 3.0])
  for other in (2.0 * a, -a):
    out = flat(merge([tree(w=a), tree(w=other)], "slerp", t=0.25))["w"]
    np.testing.assert_allclose(out, 0.75 * a + 0.25 * other, atol=1e-6)
  assert np.all(np.isfinite(flat(merge([tree(w=a), tree(w=a)], "slerp", t=0.5))["w"]))


# ---- TIES -----------------------------------------------------------------------------------
TAUS = [np.array([3.0, -1.0, 0.5, -2.0]), np.array([-1.0, 2.0, 0.2, -4.0]), np.array([2.0, -3.0, -0.1, 1.0])]
BASE = np.array([1.0, 2.0, -1.0, 0.0])


def test_ties_on_a_hand_worked_example():
  # density 0.5 keeps 2 of 4 entries: [3, 0, 0, -2], [0, 2, 0, -4], [2, -3, 0, 0]; the sum [5, -1, 0, -6]
  # elects [+, -, 0, -]; the mean over the agreeing nonzero entries is [2.5, -3, 0, -3].
  out = merge([tree(w=BASE + t) for t in TAUS], "ties", base=tree(w=BASE), density=0.5, scale=0.5)
  np.testing.assert_allclose(flat(out)["w"], BASE + 0.5 * np.array([2.5, -3.0, 0.0, -3.0]), atol=1e-6)


def test_ties_weights_elect_the_sign_and_weigh_the_mean():
  # weights [1, 3, 1]: the weighted sum [5, 3, 0, -14] elects + at entry 1 (only model 2 agrees there) and
  # entry 3 is (1 * -2 + 3 * -4) / (1 + 3).
  out = merge([tree(w=BASE + t) for t in TAUS], "ties", base=tree(w=BASE), weights=[1, 3, 1], density=0.5)
  np.testing.assert_allclose(flat(out)["w"], BASE + np.array([2.5, 2.0, 0.0, -3.5]), atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]], ids=["uniform", "weighted"])
def test_ties_matches_the_paper_on_random_task_vectors(weights):
  rng = np.random.default_rng(2)
  base = dict(a=rng.normal(size=10), b=rng.normal(size=(2, 3)))
  xs = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
  out = flat(merge([tree(**x) for x in xs], "ties", base=tree(**base), weights=weights, density=0.4, scale=0.8))
  for name in base:  # each tensor trimmed to its own top int(0.4 * size) magnitudes
    b32 = base[name].astype(np.float32)
    taus = [np_trim((x[name].astype(np.float32) - b32).astype(np.float64), 0.4) for x in xs]
    assert all(np.count_nonzero(t) == int(0.4 * b32.size) for t in taus)
    expected = b32 + 0.8 * np_disjoint_mean(taus, weights)
    np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


# ---- DARE -----------------------------------------------------------------------------------
N = 20000  # the DARE tests' task vectors: one shape, so that DARE's kernels compile once


def _dare_tau(tau: np.ndarray, density: float, seed: int = 0, method: str = "dare") -> np.ndarray:
  """The rescaled task vector DARE makes of ``tau`` (base 0, one model, scale 1)."""
  return flat(merge([tree(w=tau)], method, base=tree(w=np.zeros_like(tau)), density=density, seed=seed))["w"]


def test_dare_with_density_one_is_task_arithmetic():
  base, x, y = params(0), params(1), params(2)
  dare = merge([x, y], "dare", base=base, weights=[0.3, 0.7], density=1.0, scale=0.5)
  arithmetic = merge([x, y], "task_arithmetic", base=base, weights=[0.3, 0.7], scale=0.5)
  assert_same(dare, arithmetic, atol=1e-7)


def test_dare_masks_come_from_the_seed():
  tau = np.random.default_rng(3).normal(size=N) + 5.0
  np.testing.assert_array_equal(_dare_tau(tau, 0.5, seed=1), _dare_tau(tau, 0.5, seed=1))
  assert np.any((_dare_tau(tau, 0.5, seed=1) != 0) != (_dare_tau(tau, 0.5, seed=2) != 0))


def test_dare_keeps_a_density_fraction_rescaled_and_zeroes_the_rest():
  n, density = N, 0.3
  tau = (np.random.default_rng(4).uniform(0.5, 2.0, size=n) * np.where(np.arange(n) % 2, 1, -1)).astype(np.float32)
  out = _dare_tau(tau, density, seed=5)
  kept = out != 0
  sigma = np.sqrt(density * (1 - density) / n)
  assert abs(kept.mean() - density) < 5 * sigma
  np.testing.assert_allclose(out[kept], tau[kept] / np.float32(density), rtol=1e-6)
  np.testing.assert_array_equal(out[~kept], 0.0)


def test_dare_keeps_the_expected_task_vector():
  n, density = N, 0.2
  constant = _dare_tau(np.full(n, 1.5), density, seed=6)
  # mean = 1.5 * kept / (n density); kept ~ Binomial(n, density)
  sigma = 1.5 * np.sqrt(n * density * (1 - density)) / (n * density)
  assert abs(constant.mean() - 1.5) < 5 * sigma
  tau = np.random.default_rng(7).normal(size=n)
  out = _dare_tau(tau, density, seed=7)
  sigma = np.sqrt(np.sum(tau**2) * (1 - density) / density)  # std of Σ τ̃ around Σ τ
  assert abs(out.sum() - tau.sum()) < 5 * sigma


def test_dare_draws_its_own_mask_per_model_and_parameter():
  n, density = N, 0.5
  ones, zeros = tree(u=np.ones(n), v=np.ones(n)), tree(u=np.zeros(n), v=np.zeros(n))
  out = flat(merge([ones, ones], "dare", base=zeros, density=density, seed=0))
  # one of the two models kept an entry (value 1 / density) with probability 2 p (1 - p) = 1/2 if the masks
  # are independent, never if they were the same.
  for name in ("u", "v"):
    assert abs(np.mean(out[name] == 2.0) - 0.5) < 5 * np.sqrt(0.25 / n)
  assert np.mean(out["u"] != out["v"]) > 0.3  # the two parameters' masks differ too


def test_dare_ties_is_ties_disjoint_merge_of_the_dropped_vectors():
  rng, density, seed, n = np.random.default_rng(8), 0.5, 3, 40
  # the masks depend only on (seed, parameter, model): read them off a DARE of all-ones task vectors
  # weighted 1, 2, 4, whose value times density is the mask bits' code.
  ones, zeros = tree(w=np.ones(n)), tree(w=np.zeros(n))
  code = flat(merge([ones] * 3, "dare", base=zeros, weights=[1, 2, 4], density=density, seed=seed))["w"] * density
  code = np.rint(code).astype(int)
  masks = [(code >> t) & 1 for t in range(3)]
  assert all(0.2 < m.mean() < 0.8 for m in masks)
  base = rng.normal(size=n).astype(np.float32)
  taus = [(rng.uniform(0.5, 2.0, size=n) * rng.choice([-1, 1], size=n)).astype(np.float32) for _ in range(3)]
  weights = [1.0, 0.5, 2.0]
  out = merge([tree(w=base + t) for t in taus], "dare_ties", base=tree(w=base), weights=weights, density=density,
              seed=seed, scale=0.7)
  dropped = [m * ((base + t) - base).astype(np.float64) / density for m, t in zip(masks, taus)]
  np.testing.assert_allclose(flat(out)["w"], base + 0.7 * np_disjoint_mean(dropped, weights), rtol=1e-5, atol=1e-6)


def test_dare_ties_with_density_one_is_ties_with_density_one():
  base, x, y, z = params(0), params(1), params(2), params(3)
  kwargs = dict(base=base, weights=[1.0, 2.0, 0.5], density=1.0, scale=0.9)
  assert_same(merge([x, y, z], "dare_ties", **kwargs), merge([x, y, z], "ties", **kwargs), atol=1e-7)


# ---- Fisher ---------------------------------------------------------------------------------
def test_fisher_with_equal_fishers_is_the_weighted_average():
  rng = np.random.default_rng(9)
  xs = [rng.normal(size=6) for _ in range(3)]
  f = rng.uniform(0.1, 2.0, size=6)
  out = flat(merge([tree(w=x) for x in xs], "fisher", weights=[1, 2, 3], fishers=[tree(w=f)] * 3))["w"]
  np.testing.assert_allclose(out, (xs[0] + 2 * xs[1] + 3 * xs[2]) / 6, rtol=1e-5)


def test_fisher_weighs_each_entry_by_the_models_fishers():
  rng = np.random.default_rng(10)
  xs = [dict(a=rng.normal(size=5), b=rng.normal(size=(2, 3))) for _ in range(2)]
  fs = [dict(a=rng.uniform(0.0, 3.0, size=5), b=rng.uniform(0.0, 3.0, size=(2, 3))) for _ in range(2)]
  weights = [0.7, 1.8]
  out = flat(merge([tree(**x) for x in xs], "fisher", weights=weights, fishers=[tree(**f) for f in fs]))
  for name in ("a", "b"):
    num = sum(w * f[name] * x[name] for w, f, x in zip(weights, fs, xs))
    np.testing.assert_allclose(out[name], num / sum(w * f[name] for w, f in zip(weights, fs)), rtol=1e-5)


def test_zero_fishers_fall_back_to_the_floor():
  x, y = np.array([1.0, 2.0, -4.0]), np.array([3.0, -2.0, 0.0])
  zero = tree(w=np.zeros(3))
  out = flat(merge([tree(w=x), tree(w=y)], "fisher", weights=[1, 3], fishers=[zero, zero]))["w"]
  np.testing.assert_allclose(out, (x + 3 * y) / 4, rtol=1e-6)  # every Fisher at the floor: averaging
  out = flat(merge([tree(w=x), tree(w=y)], "fisher", fishers=[zero, tree(w=np.ones(3))], fisher_floor=1e-3))["w"]
  np.testing.assert_allclose(out, (1e-3 * x + y) / (1 + 1e-3), rtol=1e-5)


# ---- RegMean --------------------------------------------------------------------------------
def _regmean_problem(seed: int, shape, n_in: int, counts=(20, 30, 25)):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, n_in)) * rng.uniform(0.5, 2.0, size=(1, n_in)) for n in counts]
  kernels = [rng.normal(size=shape) for _ in counts]
  states = [tree(layer=dict(kernel=k), scale=rng.normal(size=4)) for k in kernels]
  return xs, kernels, states


@pytest.mark.parametrize("shape,n_in", [((4, 3), 4), ((4, 2, 3), 4), ((2, 3, 5), 6)],
                         ids=["matrix", "multi_axis_output", "multi_axis_input"])
def test_regmean_minimizes_the_stacked_least_squares(shape, n_in):
  xs, kernels, states = _regmean_problem(11, shape, n_in)
  weights = [1.0, 0.5, 2.0]
  grams = [{"layer/kernel": jnp.asarray(x.T @ x, jnp.float32)} for x in xs]
  out = flat(merge(states, "regmean", weights=weights, grams=grams, alpha=1.0))
  # argmin_W Σ_t w_t ||X_t W - X_t W_t||²
  a = np.concatenate([np.sqrt(w) * x for w, x in zip(weights, xs)])
  b = np.concatenate([np.sqrt(w) * x @ k.reshape(n_in, -1) for w, x, k in zip(weights, xs, kernels)])
  expected = np.linalg.lstsq(a, b, rcond=None)[0].reshape(shape)
  np.testing.assert_allclose(out["layer/kernel"], expected, rtol=1e-4, atol=1e-5)
  scales = [flat(s)["scale"] for s in states]  # parameters without a Gram: averaged by the weights
  np.testing.assert_allclose(out["scale"], sum(w * s for w, s in zip(weights, scales)) / sum(weights), rtol=1e-5)


def test_regmean_alpha_shrinks_the_off_diagonal_terms():
  xs, kernels, states = _regmean_problem(12, (4, 3), 4)
  weights = [1.0, 2.0, 0.5]
  gs = [x.T @ x for x in xs]
  grams = [{"layer/kernel": jnp.asarray(g, jnp.float32)} for g in gs]
  # alpha = 0: only the diagonals, so each input row is the average weighted by w_t G_t[i, i]
  out = flat(merge(states, "regmean", weights=weights, grams=grams, alpha=0.0))["layer/kernel"]
  d = [w * np.diag(g)[:, None] for w, g in zip(weights, gs)]
  np.testing.assert_allclose(out, sum(di * k for di, k in zip(d, kernels)) / sum(d), rtol=1e-5, atol=1e-6)
  # alpha = 0.5: G̃ = 0.5 G + 0.5 diag(G)
  shrunk = [w * (0.5 * g + 0.5 * np.diag(np.diag(g))) for w, g in zip(weights, gs)]
  expected = np.linalg.solve(sum(shrunk), sum(s @ k for s, k in zip(shrunk, kernels)))
  out = flat(merge(states, "regmean", weights=weights, grams=grams, alpha=0.5))["layer/kernel"]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------
def test_merge_refuses_what_it_cannot_merge_by_name():
  a, b = params(0), params(1)
  with pytest.raises(ValueError, match="method='average'.*choose one of"):
    merge([a, b], "average")
  for method in ("task_arithmetic", "ties", "dare", "dare_ties"):
    with pytest.raises(ValueError, match=f"method='{method}'.*pass base="):
      merge([a, b], method)
  with pytest.raises(ValueError, match="slerp interpolates two models; got 3"):
    merge([a, b, a], "slerp")
  with pytest.raises(ValueError, match="needs fishers="):
    merge([a, b], "fisher")
  with pytest.raises(ValueError, match="needs grams="):
    merge([a, b], "regmean", grams=[{}])
  with pytest.raises(ValueError, match="density=0.0"):
    merge([a, b], "ties", base=a, density=0.0)
  with pytest.raises(ValueError, match="density=1.5"):
    merge([a, b], "dare", base=a, density=1.5)
  with pytest.raises(ValueError, match="weights has 3 entries for 2 models"):
    merge([a, b], weights=[1, 2, 3])
  with pytest.raises(ValueError, match="at least one model"):
    merge([])


def test_merge_refuses_models_of_other_architectures_and_widths():
  a = params(0)
  deeper = abstract_params(dataclasses.replace(CFG, num_layers=3))  # refused before any compute
  wider = abstract_params(dataclasses.replace(CFG, d_model=24))
  with pytest.raises(ValueError, match=r"states\[1\] has other parameters.*one architecture"):
    merge([a, deeper])
  with pytest.raises(ValueError, match=r"states\[1\] blocks/0/.* has shape .*one width"):
    merge([a, wider])
  with pytest.raises(ValueError, match=r"has other parameters.*one architecture"):  # the base too
    merge([a, a], "task_arithmetic", base=deeper)


def test_a_fisher_of_another_width_is_named_by_its_own_index():
  a, wider = params(0), abstract_params(dataclasses.replace(CFG, d_model=24))
  with pytest.raises(ValueError, match=r"one width"):
    merge([a, a], "fisher", fishers=[a, wider])
  with pytest.raises(ValueError, match=r"^fishers\[1\] blocks/"):  # fishers[1] is the one of another width
    merge([a, a], "fisher", fishers=[a, wider])


# ---- dtypes ---------------------------------------------------------------------------------
def test_merge_casts_to_the_requested_dtype():
  out = merge([params(0), params(1)], dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in flat(out).values())
  a, b = flat(params(0)), flat(params(1))
  for name, value in flat(out).items():
    np.testing.assert_allclose(value.astype(np.float32), (a[name] + b[name]) / 2, rtol=2**-8, atol=1e-6)


def test_bfloat16_inputs_are_merged_in_float32():
  # 256 + 1 + 1 is 256 in bfloat16 (8 significant bits) but 258 in float32: the mean is 86, not 85.5.
  xs = [np.array([256.0, 1.0]), np.array([1.0, 2.0]), np.array([1.0, 3.0])]
  trees = [jax.tree.map(lambda v: v.astype(jnp.bfloat16), tree(w=x)) for x in xs]
  out = merge(trees)["w"].get_value()
  assert out.dtype == jnp.bfloat16  # the inputs' dtype by default
  np.testing.assert_array_equal(np.asarray(out, np.float32), [86.0, 2.0])
  out = merge(trees, dtype=jnp.float32)["w"].get_value()
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), [86.0, 2.0])
  rng = np.random.default_rng(13)
  xs = [rng.normal(size=64) for _ in range(3)]
  trees = [jax.tree.map(lambda v: v.astype(jnp.bfloat16), tree(w=x)) for x in xs]
  exact = np.mean([np.asarray(t["w"].get_value(), np.float64) for t in trees], axis=0)
  np.testing.assert_allclose(np.asarray(merge(trees)["w"].get_value(), np.float64), exact, rtol=2**-8, atol=1e-6)


# ---- under jit ------------------------------------------------------------------------------
def test_ties_runs_under_jit_on_sharded_states():
  a, b, c_ = params(0), params(1), params(2)
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec())
  merged = jax.jit(lambda a, b: merge([a, b], "ties", base=c_, density=0.3))(*jax.device_put((a, b), sharding))
  chex.assert_trees_all_close(merged, merge([a, b], "ties", base=c_, density=0.3), atol=1e-6, rtol=0)


def test_dare_ties_runs_under_jit():
  rng = np.random.default_rng(14)
  xs = [tree(w=rng.normal(size=40)) for _ in range(3)]
  merged = jax.jit(lambda a, b, base: merge([a, b], "dare_ties", base=base, density=0.5, seed=4))(*xs)
  chex.assert_trees_all_close(merged, merge(xs[:2], "dare_ties", base=xs[2], density=0.5, seed=4), atol=1e-6, rtol=0)
