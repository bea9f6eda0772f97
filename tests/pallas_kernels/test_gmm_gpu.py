"""The grouped-matmul Pallas GPU kernels (`pallas_kernels.gmm.gpu`) in interpret mode
against a loop over groups in numpy: empty groups, one-row groups, groups straddling row
tiles, rows past sum(group_sizes) (NaN in the inputs, exactly zero out), lengths that
are not multiples of the blocks, transpose_rhs, fp32 and bf16, group_sizes traced under
jit; and both kernels lower for CUDA from this CPU at model-sized shapes."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm.gpu import Launch, gmm, tgmm

SMALL = Launch(block_m=16, block_n=32, block_k=16)  # several row tiles, n tiles and k steps
CASES = {
    # name: (m, k, n, group_sizes, launch)
    "empty_and_single_rows": (75, 48, 40, [0, 1, 30, 0, 20, 1, 0], SMALL),  # sum 52 < 75
    "exact_fit_straddling": (64, 32, 64, [16, 17, 31], SMALL),  # sum = m, two tiles straddled
    "all_empty": (40, 16, 24, [0, 0, 0], SMALL),
    "last_group_ends_at_m": (37, 24, 33, [0, 0, 37], SMALL),  # m, k, n not multiples of blocks
    "default_launch": (200, 96, 80, [150, 0, 17], Launch()),  # default blocks shrunk, k, n padded
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def case_inputs(name, dtype, transpose_rhs=False):
  """lhs [m, k], rhs, grad [m, n] and group_sizes; lhs and grad are NaN past the groups."""
  m, k, n, sizes, launch = CASES[name]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  g, total = len(sizes), sum(sizes)
  lhs = rng.standard_normal((m, k), np.float32)
  grad = rng.standard_normal((m, n), np.float32)
  lhs[total:], grad[total:] = np.nan, np.nan
  rhs = rng.standard_normal((g, n, k) if transpose_rhs else (g, k, n), np.float32)
  as_dtype = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
  return as_dtype(lhs), as_dtype(rhs), as_dtype(grad), jnp.asarray(sizes, jnp.int32), launch


def f32(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


def naive_gmm(lhs, rhs, sizes, transpose_rhs):
  lhs, rhs = f32(lhs), f32(rhs)
  out = np.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), np.float32)
  start = 0
  for i, size in enumerate(np.asarray(sizes)):
    w = rhs[i].T if transpose_rhs else rhs[i]
    out[start:start + size] = lhs[start:start + size] @ w
    start += size
  return out


def naive_tgmm(lhs, grad, sizes):
  lhs, grad = f32(lhs), f32(grad)
  out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]), np.float32)
  start = 0
  for i, size in enumerate(np.asarray(sizes)):
    out[i] = lhs[start:start + size].T @ grad[start:start + size]
    start += size
  return out


def assert_close(got, want, tol):
  got = f32(got)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got)), "NaN/Inf in the output"
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= tol * scale, f"max error {err} > {tol * scale}"


@pytest.mark.parametrize("name, dtype, transpose_rhs", [
    ("empty_and_single_rows", jnp.float32, False),
    ("empty_and_single_rows", jnp.bfloat16, True),
    ("exact_fit_straddling", jnp.float32, True),
    ("exact_fit_straddling", jnp.bfloat16, False),
    ("all_empty", jnp.float32, False),
    ("last_group_ends_at_m", jnp.float32, False),
    ("last_group_ends_at_m", jnp.bfloat16, True),
    ("default_launch", jnp.float32, True),
    ("default_launch", jnp.bfloat16, False),
])
def test_gmm_matches_loop_over_groups(name, dtype, transpose_rhs):
  lhs, rhs, _, sizes, launch = case_inputs(name, dtype, transpose_rhs)
  out = gmm(lhs, rhs, sizes, transpose_rhs=transpose_rhs, launch=launch, interpret=True)
  assert out.dtype == dtype
  assert_close(out, naive_gmm(lhs, rhs, sizes, transpose_rhs), TOLERANCE[dtype])
  assert np.all(f32(out)[int(sizes.sum()):] == 0.0), "rows past the groups are not exactly zero"


@pytest.mark.parametrize("name, dtype", [
    ("empty_and_single_rows", jnp.float32),
    ("empty_and_single_rows", jnp.bfloat16),
    ("exact_fit_straddling", jnp.float32),
    ("all_empty", jnp.bfloat16),
    ("last_group_ends_at_m", jnp.float32),
    ("default_launch", jnp.bfloat16),
])
def test_tgmm_matches_loop_over_groups(name, dtype):
  lhs, _, grad, sizes, launch = case_inputs(name, dtype)
  out = tgmm(lhs, grad, sizes, launch=launch, interpret=True)
  assert out.dtype == dtype
  assert_close(out, naive_tgmm(lhs, grad, sizes), TOLERANCE[dtype])
  assert np.all(f32(out)[np.asarray(sizes) == 0] == 0.0), "empty groups are not exactly zero"


def test_fp32_output_from_bf16_inputs():
  lhs, rhs, grad, sizes, launch = case_inputs("empty_and_single_rows", jnp.bfloat16)
  out = gmm(lhs, rhs, sizes, out_dtype=jnp.float32, launch=launch, interpret=True)
  assert out.dtype == jnp.float32
  assert_close(out, naive_gmm(lhs, rhs, sizes, False), 1e-5)  # fp32 sums of exact products
  drhs = tgmm(lhs, grad, sizes, out_dtype=jnp.float32, launch=launch, interpret=True)
  assert drhs.dtype == jnp.float32
  assert_close(drhs, naive_tgmm(lhs, grad, sizes), 1e-5)


def test_traced_group_sizes_one_compile():
  """One jitted function, traced once, serves different group sizes (and sums)."""
  traces = []

  @jax.jit
  def both(lhs, rhs, grad, sizes):
    traces.append(1)
    return (gmm(lhs, rhs, sizes, launch=SMALL, interpret=True),
            tgmm(lhs, grad, sizes, launch=SMALL, interpret=True))

  lhs, rhs, grad, _, _ = case_inputs("empty_and_single_rows", jnp.float32)
  lhs, grad = jnp.nan_to_num(lhs), jnp.nan_to_num(grad)
  for sizes in ([3, 0, 0, 40, 1, 9, 20], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 60]):
    sizes = jnp.asarray(sizes, jnp.int32)
    out, drhs = both(lhs, rhs, grad, sizes)
    assert_close(out, naive_gmm(lhs, rhs, sizes, False), 1e-5)
    assert np.all(f32(out)[int(sizes.sum()):] == 0.0)
    assert_close(drhs, naive_tgmm(lhs, grad, sizes), 1e-5)
  assert len(traces) == 1


def test_blocks_must_be_powers_of_two():
  lhs, rhs, _, sizes, _ = case_inputs("all_empty", jnp.float32)
  with pytest.raises(ValueError, match="block_n=48"):
    gmm(lhs, rhs, sizes, launch=Launch(block_n=48), interpret=True)
