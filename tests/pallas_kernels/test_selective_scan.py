"""Selective scan: every implementation against the fp32 sequential reference, outputs,
final states and all gradients, over grouped/ungrouped B and C, the optional D, z,
delta_bias + softplus and initial state, odd lengths and dtypes."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.selective_scan.reference import selective_scan_reference

# Small chunks so that short test sequences still span several of them.
IMPLEMENTATIONS = {
    "sequential": dict(implementation="sequential"),
    "associative": dict(implementation="associative"),
    "xla": dict(implementation="xla", chunk_size=8),
    "tpu_interpret": dict(implementation="pallas_interpret", interpret_backend="tpu", chunk_size=8),
    "gpu_interpret": dict(implementation="pallas_interpret", interpret_backend="gpu", chunk_size=8),
}


def inputs(name, b, t, d, n, groups, dtype, extras):
  """Fresh random inputs seeded by the test case, Mamba-like: A = -exp(.) < 0, delta > 0
  after softplus. ``groups`` None means B and C are [b, t, n]."""
  keys = iter(jax.random.split(jax.random.key(zlib.crc32(name.encode())), 12))
  normal = lambda shape, scale=1.0: (scale * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
  bc = (b, t, n) if groups is None else (b, t, groups, n)
  args = dict(u=normal((b, t, d)), delta=normal((b, t, d), 0.5), A=-jnp.exp(normal((d, n), 0.5)),
              B=normal(bc), C=normal(bc))
  optional = dict(D=normal((d,)), z=normal((b, t, d)), delta_bias=normal((d,), 0.5),
                  initial_state=jax.random.normal(next(keys), (b, d, n)))
  args.update({k: v for k, v in optional.items() if k in extras})
  if "delta_bias" not in extras:  # keep delta positive without softplus
    args["delta"] = jnp.abs(args["delta"])
  cotangents = (normal((b, t, d)), jax.random.normal(next(keys), (b, d, n)))
  return args, cotangents


def run(fn, args, cotangents, softplus):
  """(y, final state) and the gradients of <cotangents, (y, final)> w.r.t. every input."""
  names = sorted(args)

  def f(*values):
    kw = dict(zip(names, values))
    return fn(**kw, delta_softplus=softplus, return_final_state=True)

  out, vjp = jax.vjp(f, *(args[k] for k in names))
  return out, dict(zip(names, vjp(cotangents)))


def assert_close(name, got, want, tol):
  got = np.asarray(got.astype(jnp.float32))
  assert np.all(np.isfinite(got)), f"{name} has NaN/Inf"
  scale = max(1.0, float(jnp.abs(want).max()))
  err = float(np.abs(got - np.asarray(want)).max())
  assert err <= tol * scale, f"{name}: max error {err} > {tol * scale}"


def check(case, impl, *, b=2, t=33, d=8, n=4, groups=None, dtype=jnp.float32, extras=(),
          softplus=False):
  args, cotangents = inputs(case, b, t, d, n, groups, dtype, extras)
  out, grads = run(lambda **kw: selective_scan(**kw, **IMPLEMENTATIONS[impl]), args, cotangents, softplus)
  f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
  ref_out, ref_grads = run(selective_scan_reference, f32,
                           tuple(c.astype(jnp.float32) for c in cotangents), softplus)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert out[0].dtype == dtype and out[1].dtype == jnp.float32
  assert_close("y", out[0], ref_out[0], tol)
  assert_close("final_state", out[1], ref_out[1], tol)
  for k in sorted(args):
    assert grads[k].shape == args[k].shape and grads[k].dtype == args[k].dtype, k
    assert_close(f"d{k}", grads[k], ref_grads[k], tol)


CASES = {
    # grouped B/C (g = 2, d = 8), every option on, a length of several chunks plus one
    "grouped_all_options": dict(t=129, groups=2, softplus=True,
                                extras=("D", "z", "delta_bias", "initial_state")),
    # bf16, ungrouped, batch 1, odd length; D off, the rest on
    "bf16_batch1": dict(b=1, t=7, dtype=jnp.bfloat16, softplus=True,
                        extras=("z", "delta_bias", "initial_state")),
    # one step, one group, batch 1, channels spanning several (padded) tiles of both
    # kernels; D and z on, no bias, softplus or initial state
    "one_step_wide": dict(b=1, t=1, d=300, groups=1, extras=("D", "z")),
}
# The full-length associative scan compiles slowly: checked on the case with every option.
PAIRS = [(case, impl) for case in sorted(CASES) for impl in sorted(IMPLEMENTATIONS)
         if impl != "associative" or case == "grouped_all_options"]


@pytest.mark.parametrize("case, impl", PAIRS)
def test_matches_reference(case, impl):
  check(case, impl, **CASES[case])


@pytest.mark.parametrize("impl", ["xla", "tpu_interpret", "gpu_interpret"])
def test_two_halves_with_carried_state_equal_the_whole(impl):
  args, _ = inputs("halves", 2, 21, 8, 4, 2, jnp.float32, ("D", "initial_state"))
  kw = dict(return_final_state=True, **IMPLEMENTATIONS[impl])
  y, final = selective_scan(**args, **kw)
  first = {k: v[:, :10] if k in ("u", "delta", "B", "C") else v for k, v in args.items()}
  second = {k: v[:, 10:] if k in ("u", "delta", "B", "C") else v for k, v in args.items()}
  y1, mid = selective_scan(**first, **kw)
  y2, final2 = selective_scan(**{**second, "initial_state": mid}, **kw)
  np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final2, final, rtol=1e-5, atol=1e-5)


def test_default_implementation_on_cpu_is_the_chunked_path():
  args, _ = inputs("default", 1, 40, 8, 4, None, jnp.float32, ("D",))
  np.testing.assert_allclose(selective_scan(**args, chunk_size=16),
                             selective_scan(**args, implementation="xla", chunk_size=16), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(implementation="triton"), "implementation='triton'"),
        (dict(implementation="pallas_interpret", interpret_backend="cpu"), "interpret_backend='cpu'"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(D=jnp.ones(3)), "D must be"),
        (dict(delta_bias=jnp.ones(3)), "delta_bias must be"),
        (dict(z=jnp.ones((1, 8, 3))), "z must have"),
        (dict(initial_state=jnp.ones((1, 5, 4))), "initial_state must be"),
        (dict(delta=jnp.ones((1, 7, 6))), "delta must have"),
        (dict(A=jnp.ones((5, 4))), "A must be"),
        (dict(B=jnp.ones((1, 8, 4, 4)), C=jnp.ones((1, 8, 4, 4))), "multiple of the groups"),
        (dict(C=jnp.ones((1, 8, 5))), "B and C must have the same shape"),
        (dict(B=jnp.ones((1, 8, 5)), C=jnp.ones((1, 8, 5))), r"B and C must be \[b, t, n\]"),
    ],
)
def test_bad_arguments(kwargs, message):
  args = dict(u=jnp.ones((1, 8, 6)), delta=jnp.ones((1, 8, 6)), A=-jnp.ones((6, 4)),
              B=jnp.ones((1, 8, 4)), C=jnp.ones((1, 8, 4)))
  with pytest.raises(ValueError, match=message):
    selective_scan(**{**args, **kwargs})
