"""Model-GLUE's weight similarity and clustering: the per-column cosine against numpy, the
similarity of a model with itself, the matrices it reads (the mixers' and FFNs' weight
matrices, nothing else), and the clustering into families on hand-made similarity
matrices (a model that matches no family opens its own; the threshold is strict)."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.merging import cluster, similarity, similarity_matrix
from jaxlab.merging.clustering import column_cosine, weight_matrices
from jaxlab.nn import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=16)
# the tiny model's weight matrices and their numbers of output axes, written out by hand
MIXER = {"q": 2, "k": 2, "v": 2, "o": 1}
FFN = {"gate": 1, "up": 1, "down": 1}


@functools.cache
def params(seed: int) -> nnx.State:
  return nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)), nnx.Param, ...)[1]


def flat(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(state)}


def np_column_cosine(a: np.ndarray, b: np.ndarray, out_axes: int) -> float:
  """Mean over the leading (input) indices of the cosine of the two sub-arrays they index."""
  lead = a.shape[:a.ndim - out_axes]
  cosines = [np.sum(a[i] * b[i]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in np.ndindex(lead)]
  return float(np.mean(cosines))


def np_similarity(a: nnx.State, b: nnx.State, base: nnx.State | None = None) -> dict[str, float]:
  a, b = flat(a), flat(b)
  base = None if base is None else flat(base)
  scores = {"mixer": [], "ffn": []}
  for layer in range(CFG.num_layers):
    for part, matrices in (("mixer", MIXER), ("ffn", FFN)):
      for matrix, out_axes in matrices.items():
        name = f"blocks/{layer}/{part}/{matrix}/kernel"
        x, y = a[name], b[name]
        if base is not None:
          x, y = x - base[name], y - base[name]
        scores[part].append(np_column_cosine(x, y, out_axes))
  return {"mixer": np.mean(scores["mixer"]), "ffn": np.mean(scores["ffn"]),
          "all": np.mean(scores["mixer"] + scores["ffn"])}


# ---- column cosine and similarity -----------------------------------------------------------
@pytest.mark.parametrize("shape,out_axes", [((3, 4), 1), ((2, 3, 5), 1), ((2, 3, 5), 2)])
def test_column_cosine_matches_numpy(shape, out_axes):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=shape), rng.normal(size=shape)
  b[0] = 2.5 * a[0]  # one column exactly parallel (cosine 1)
  got = float(column_cosine(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), out_axes))
  np.testing.assert_allclose(got, np_column_cosine(a, b, out_axes), rtol=1e-5, atol=1e-6)


def test_column_cosine_of_a_column_and_its_negative_is_minus_one():
  a = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_allclose(float(column_cosine(jnp.asarray(a), jnp.asarray(-a), 1)), -1.0, atol=1e-6)


def test_a_model_is_similar_to_itself():
  for part, value in similarity(params(0), params(0), CFG).items():
    np.testing.assert_allclose(value, 1.0, atol=1e-5, err_msg=part)


def test_similarity_is_the_mean_column_cosine_of_the_weight_matrices():
  got = similarity(params(0), params(1), CFG)
  expected = np_similarity(params(0), params(1))
  assert got.keys() == expected.keys()
  for part in expected:
    np.testing.assert_allclose(got[part], expected[part], rtol=1e-4, atol=1e-5, err_msg=part)


def test_similarity_of_deltas_to_a_base_is_finite_and_matches_numpy():
  a, b, c = params(0), params(1), params(2)
  got = similarity(b, c, CFG, base=a)
  expected = np_similarity(b, c, base=a)
  for part in expected:
    assert np.isfinite(got[part]), part
    np.testing.assert_allclose(got[part], expected[part], rtol=1e-4, atol=1e-5, err_msg=part)
  assert all(np.isfinite(v) for v in similarity(a, b, CFG, base=a).values())  # one delta is zero


def test_the_similarity_matrix_is_symmetric_with_a_unit_diagonal():
  states = [params(0), params(1), params(2)]
  matrix = similarity_matrix(states, CFG, part="ffn")
  assert matrix.shape == (3, 3)
  np.testing.assert_array_equal(matrix, matrix.T)
  np.testing.assert_array_equal(np.diag(matrix), 1.0)
  np.testing.assert_allclose(matrix[0, 2], np_similarity(states[0], states[2])["ffn"], rtol=1e-4, atol=1e-5)


# ---- the matrices it reads ------------------------------------------------------------------
def test_weight_matrices_are_the_mixers_and_ffns_kernels():
  expected = {f"blocks/{layer}/{part}/{matrix}/kernel": out_axes for layer in range(CFG.num_layers)
              for part, matrices in (("mixer", MIXER), ("ffn", FFN)) for matrix, out_axes in matrices.items()}
  assert weight_matrices(CFG) == expected  # no embedding, head or norm


def test_weight_matrices_of_an_moe_model_list_the_expert_stacks_and_the_router():
  moe = dataclasses.replace(CFG, ffns=("moe",), moe_num_experts=4)
  got = weight_matrices(moe)
  for layer in range(moe.num_layers):
    for name in ("gate", "up", "down"):  # [expert, in, out]: one column per (expert, input)
      assert got.pop(f"blocks/{layer}/ffn/experts/{name}") == 1
    assert got.pop(f"blocks/{layer}/ffn/router/kernel", None) == 1  # [d_model, experts]
    for matrix, out_axes in MIXER.items():
      assert got.pop(f"blocks/{layer}/mixer/{matrix}/kernel") == out_axes
  assert not got


# ---- clustering -----------------------------------------------------------------------------
def test_cluster_finds_two_families():
  s = np.array([[1.0, 0.99, 0.10, 0.20],
                [0.99, 1.0, 0.15, 0.10],
                [0.10, 0.15, 1.0, 0.97],
                [0.20, 0.10, 0.97, 1.0]])
  assert cluster(s, threshold=0.95) == [[0, 1], [2, 3]]


def test_a_model_that_matches_no_family_opens_its_own():
  s = np.array([[1.0, 0.99, 0.10, 0.98],
                [0.99, 1.0, 0.20, 0.97],
                [0.10, 0.20, 1.0, 0.30],
                [0.98, 0.97, 0.30, 1.0]])
  assert cluster(s, threshold=0.95) == [[0, 1, 3], [2]]
  assert cluster(np.array([[1.0, 0.1], [0.1, 1.0]]), threshold=0.5) == [[0], [1]]
  assert cluster(np.eye(3), threshold=0.5) == [[0], [1], [2]]


def test_a_model_joins_the_first_family_whose_first_member_it_matches():
  # model 2 matches model 1 but not model 0, the first member of their family: it opens its own;
  # model 3 matches the first members of both families and joins the first.
  s = np.array([[1.0, 0.96, 0.50, 0.97],
                [0.96, 1.0, 0.99, 0.10],
                [0.50, 0.99, 1.0, 0.98],
                [0.97, 0.10, 0.98, 1.0]])
  assert cluster(s, threshold=0.95) == [[0, 1, 3], [2]]


def test_the_cluster_threshold_is_strict():
  s = np.array([[1.0, 0.9], [0.9, 1.0]])
  assert cluster(s, threshold=0.9) == [[0], [1]]
  assert cluster(s, threshold=np.nextafter(0.9, 0.0)) == [[0, 1]]
