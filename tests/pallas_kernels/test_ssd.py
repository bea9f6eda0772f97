"""SSD: every implementation against the fp32 sequential reference, outputs, final
states and all gradients, over groups, D, initial states, odd lengths and dtypes."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd.ops import ssd
from pallas_kernels.ssd.reference import ssd_reference

IMPLEMENTATIONS = {
    "sequential": dict(implementation="sequential"),
    "xla": dict(implementation="xla"),
    "tpu_interpret": dict(implementation="pallas_interpret", interpret_backend="tpu"),
    "gpu_interpret": dict(implementation="pallas_interpret", interpret_backend="gpu"),
}
CHUNKED = sorted(set(IMPLEMENTATIONS) - {"sequential"})
CHUNK = 16  # small, so that short test sequences span several chunks


def inputs(name, b, t, h, g, p, n, dtype):
  """Fresh random inputs, seeded by the test case: x, dt, A, B, C, D, initial state,
  and cotangents for y and the final state."""
  keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 9)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
  x = normal(keys[0], (b, t, h, p)).astype(dtype)
  dt = jax.nn.softplus(normal(keys[1], (b, t, h)) - 1.0).astype(dtype)
  A = -jnp.exp(jax.random.uniform(keys[2], (h,), minval=-1.0, maxval=1.5))
  B = normal(keys[3], (b, t, g, n)).astype(dtype)
  C = normal(keys[4], (b, t, g, n)).astype(dtype)
  D = normal(keys[5], (h,))
  s0 = normal(keys[6], (b, h, p, n))
  dy = normal(keys[7], (b, t, h, p)).astype(dtype)
  dfinal = normal(keys[8], (b, h, p, n))
  return (x, dt, A, B, C, D, s0), (dy, dfinal)


def assert_close(name, got, want, tol):
  got = np.asarray(got.astype(jnp.float32))
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  assert np.all(np.isfinite(got)), f"{name} has NaN/Inf"
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - np.asarray(want)).max())
  assert err <= tol * scale, f"{name}: max error {err} > {tol * scale}"


def _outputs_and_grads(fn, use_D, use_state):
  """A jitted (x, dt, A, B, C, D, s0, dy, dfinal) -> ((y, final), gradients of all 7)."""

  def run(x, dt, A, B, C, D, s0):
    return fn(x, dt, A, B, C, D=D if use_D else None, initial_state=s0 if use_state else None,
              return_final_state=True)

  def outputs_and_grads(*args):
    outs, vjp = jax.vjp(run, *args[:7])
    return outs, vjp(args[7:])

  return jax.jit(outputs_and_grads)


@functools.cache
def reference(case, b, t, h, g, p, n, dtype, use_D, use_state):
  """The fp32 reference on the same (rounded) inputs; shared by every implementation."""
  args, cotangents = inputs(case, b, t, h, g, p, n, dtype)
  f32 = [a.astype(jnp.float32) for a in (*args, *cotangents)]
  return _outputs_and_grads(ssd_reference, use_D, use_state)(*f32)


def check(case, impl, *, b=1, t=129, h=4, g=2, p=16, n=16, dtype=jnp.float32, use_D=True,
          use_state=True):
  args, cotangents = inputs(case, b, t, h, g, p, n, dtype)
  fn = functools.partial(ssd, chunk_size=CHUNK, **IMPLEMENTATIONS[impl])
  (y, final), grads = _outputs_and_grads(fn, use_D, use_state)(*args, *cotangents)
  (ref_y, ref_final), ref_grads = reference(case, b, t, h, g, p, n, dtype, use_D, use_state)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert y.dtype == dtype and final.dtype == jnp.float32
  assert_close("y", y, ref_y, tol)
  assert_close("final_state", final, ref_final, tol)
  names = ("dx", "ddt", "dA", "dB", "dC", "dD", "d_initial_state")
  for name, got, want, arg in zip(names, grads, ref_grads, args):
    assert got.dtype == arg.dtype, name
    assert_close(name, got, want, tol)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_groups_D_and_initial_state(impl):
  """h = 4 heads over g = 2 groups, with D and an initial state; t = 129 with chunk 16."""
  check("groups2", impl)


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("t", [1, 7])
def test_short_lengths_one_group_batch_one(impl, t):
  """Shorter than a chunk; one group shared by every head; no D, no initial state."""
  check(f"short-{t}", impl, b=1, t=t, g=1, use_D=False, use_state=False)


@pytest.mark.parametrize("impl", CHUNKED)
def test_bfloat16(impl):
  check("bf16", impl, b=2, t=40, g=1, dtype=jnp.bfloat16, p=32)


@pytest.mark.parametrize("impl", CHUNKED)
def test_two_halves_with_carried_state_equal_the_whole(impl):
  (x, dt, A, B, C, D, _), _ = inputs("halves", 1, 50, 2, 1, 16, 16, jnp.float32)

  @jax.jit
  def whole_and_halves(x, dt, B, C):
    fn = lambda sl, s0: ssd(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D=D, initial_state=s0,  # noqa: E731
                            chunk_size=CHUNK, return_final_state=True, **IMPLEMENTATIONS[impl])
    y1, mid = fn(slice(0, 21), None)
    return fn(slice(None), None), y1, fn(slice(21, None), mid)

  (y, final), y1, (y2, final2) = whole_and_halves(x, dt, B, C)
  np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(final2, final, atol=1e-4, rtol=1e-4)


def test_default_implementation_on_cpu_is_the_xla_path():
  (x, dt, A, B, C, D, _), _ = inputs("default", 1, 33, 2, 1, 8, 8, jnp.float32)
  both = jax.jit(lambda *a: (ssd(*a, D=D), ssd(*a, D=D, implementation="xla")))(x, dt, A, B, C)
  np.testing.assert_allclose(*both, atol=1e-6)


def test_under_a_mesh_runs_in_shard_map():
  (x, dt, A, B, C, D, s0), _ = inputs("mesh", 2, 20, 4, 2, 8, 8, jnp.float32)
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kw = dict(D=D, initial_state=s0, return_final_state=True, chunk_size=8, implementation="xla")
  want = ssd(x, dt, A, B, C, **kw)
  fn = lambda *a: ssd(*a, **kw, batch_axes="data", head_axes="model")  # noqa: E731
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(fn)(x, dt, A, B, C))
    got = jax.jit(fn)(x, dt, A, B, C)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(implementation="triton"), "implementation='triton'"),
        (dict(implementation="pallas_interpret", interpret_backend="cpu"), "interpret_backend='cpu'"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(D=jnp.ones(3)), "D must be"),
        (dict(A=jnp.ones(3)), "A must be"),
        (dict(dt=jnp.ones((1, 8, 3))), "dt must be"),
        (dict(B=jnp.ones((1, 8, 3, 16)), C=jnp.ones((1, 8, 3, 16))), "multiple of the groups"),
        (dict(C=jnp.ones((1, 8, 2, 8))), "C must have B's shape"),
        (dict(initial_state=jnp.ones((1, 4, 16, 8))), "initial_state must be"),
        (dict(x=jnp.ones((1, 8, 64))), "x must be"),
    ],
)
def test_bad_arguments(change, message):
  kw = dict(x=jnp.ones((1, 8, 4, 16)), dt=jnp.ones((1, 8, 4)), A=-jnp.ones(4), B=jnp.ones((1, 8, 2, 16)),
            C=jnp.ones((1, 8, 2, 16)))
  kw.update(change)
  with pytest.raises(ValueError, match=message):
    ssd(**kw)
