"""gmm and tgmm: every implementation against the per-group reference, output and both
gradients, over empty groups, one-row groups, unused trailing rows, odd sizes, a traced
``group_sizes`` under jit, transposed rhs, fp32 and bf16."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm.ops import gmm, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference

IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "ragged_dot": dict(implementation="ragged_dot"),
    "tpu_interpret": dict(implementation="pallas_interpret", interpret_backend="tpu"),
    "gpu_interpret": dict(implementation="pallas_interpret", interpret_backend="gpu"),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# (m, k, n, group sizes): sums below m leave unused trailing rows.
CASES = {
    "empty_and_one_row_groups": (67, 40, 24, (20, 0, 1, 0, 30)),
    "unused_trailing_rows": (300, 64, 136, (100, 0, 1, 140, 9)),
    "all_rows_one_group": (129, 16, 8, (0, 129, 0)),
    "every_group_empty": (24, 16, 16, (0, 0)),
}


def inputs(name, m, k, n, g, dtype, transpose_rhs):
  """lhs with NaN in the rows past the group sizes' sum (they must never leak), rhs and
  an output cotangent, seeded by the case's name."""
  keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32)
  rhs = jax.random.normal(keys[1], (g, n, k) if transpose_rhs else (g, k, n), jnp.float32) / np.sqrt(k)
  dout = jax.random.normal(keys[2], (m, n), jnp.float32)
  return lhs.astype(dtype), rhs.astype(dtype), dout.astype(dtype)


def with_nan_past(lhs, total):
  return jnp.where(jnp.arange(lhs.shape[0])[:, None] >= total, jnp.nan, lhs)


def assert_close(what, got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert np.all(np.isfinite(got)), f"{what} has NaN/Inf"
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= tol * scale, f"{what}: max error {err} > {tol * scale}"


def output_and_grads(product, lhs, rhs, sizes, dout):
  out, vjp = jax.vjp(lambda a, b: product(a, b, sizes), lhs, rhs)
  return (out, *vjp(dout))


# the transposed rhs in fp32; jax's ragged_dot (slow on CPU) on one case
MATRIX = [(i, c, d, t) for i in sorted(IMPLEMENTATIONS) for c in sorted(CASES) for d in ("f32", "bf16")
          for t in (False, True) if (d == "f32" or not t)
          and (i != "ragged_dot" or (c == "unused_trailing_rows" and not t))]


@pytest.mark.parametrize("implementation, case, dtype, transpose_rhs", MATRIX)
def test_output_and_gradients_match_reference(implementation, case, dtype, transpose_rhs):
  m, k, n, sizes = CASES[case]
  sizes = jnp.asarray(sizes, jnp.int32)
  dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  lhs, rhs, dout = inputs(case, m, k, n, len(sizes), dtype, transpose_rhs)
  lhs = with_nan_past(lhs, int(sizes.sum()))
  options = dict(transpose_rhs=transpose_rhs)
  got = jax.jit(lambda *a: output_and_grads(
      lambda x, w, s: gmm(x, w, s, **options, **IMPLEMENTATIONS[implementation]), *a))(
          lhs, rhs, sizes, dout)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  want = output_and_grads(lambda x, w, s: gmm_reference(x, w, s, transpose_rhs), f32(lhs), f32(rhs),
                          sizes, f32(dout))
  for what, g, w in zip(("out", "dlhs", "drhs"), got, want):
    assert_close(f"{implementation} {what}", g, w, TOL[dtype])
  rows = np.arange(m) >= int(sizes.sum())
  assert np.all(np.asarray(got[0])[rows] == 0) and np.all(np.asarray(got[1])[rows] == 0)


@pytest.mark.parametrize("implementation", ["xla", "tpu_interpret", "gpu_interpret"])
def test_tgmm_matches_reference(implementation):
  m, k, n, sizes = CASES["unused_trailing_rows"]
  sizes = jnp.asarray(sizes, jnp.int32)
  lhs, _, grad = inputs("tgmm", m, k, n, len(sizes), jnp.float32, False)
  total = int(sizes.sum())
  lhs, grad = with_nan_past(lhs, total), with_nan_past(grad, total)
  got = jax.jit(lambda a, b, s: tgmm(a, b, s, **IMPLEMENTATIONS[implementation]))(lhs, grad, sizes)
  assert_close(implementation, got, tgmm_reference(lhs, grad, sizes), TOL[jnp.float32])
  assert np.all(np.asarray(got[1]) == 0)  # the empty group


def test_one_compilation_serves_every_group_split():
  """group_sizes is traced: one jitted function, several splits of the rows."""
  m, k, n = 50, 24, 16
  lhs, rhs, _ = inputs("traced", m, k, n, 3, jnp.float32, False)
  product = jax.jit(lambda x, w, s: gmm(x, w, s, implementation="xla"))
  for sizes in ((50, 0, 0), (10, 20, 20), (0, 1, 33)):
    sizes = jnp.asarray(sizes, jnp.int32)
    assert_close(str(sizes), product(lhs, rhs, sizes), gmm_reference(lhs, rhs, sizes), 1e-5)
  assert product._cache_size() == 1


def test_reference_is_the_per_group_product():
  """The specification itself, against numpy slicing."""
  lhs = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
  rhs = np.random.default_rng(1).normal(size=(3, 3, 2)).astype(np.float32)
  want = np.concatenate([lhs[:4] @ rhs[0], lhs[4:7] @ rhs[2], np.zeros((2, 2), np.float32)])
  got = gmm_reference(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray([4, 0, 3]))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(lhs=(4, 3, 1)), "lhs must be"),
    (dict(rhs=(2, 5, 2)), "has k=3"),
    (dict(sizes=(3,)), "group_sizes must be"),
    (dict(implementation="megablox"), "implementation='megablox'"),
])
def test_bad_arguments_are_named(bad, message):
  lhs = jnp.zeros(bad.get("lhs", (4, 3)))
  rhs = jnp.zeros(bad.get("rhs", (2, 3, 2)))
  sizes = jnp.zeros(bad.get("sizes", (2,)), jnp.int32)
  with pytest.raises(ValueError, match=message):
    gmm(lhs, rhs, sizes, implementation=bad.get("implementation"))
