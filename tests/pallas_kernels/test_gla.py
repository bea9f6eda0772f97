"""Gated linear attention: every implementation against the fp32 sequential reference,
outputs, final states and all five gradients, over odd lengths, dk != dv, strong
decays, bf16, and a sequence run in two halves."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla.ops import gla
from pallas_kernels.gla.reference import gla_reference

IMPLEMENTATIONS = {
    "sequential": dict(implementation="sequential"),
    "xla": dict(implementation="xla"),
    "tpu_interpret": dict(implementation="pallas_interpret", interpret_backend="tpu"),
    "gpu_interpret": dict(implementation="pallas_interpret", interpret_backend="gpu"),
}
CHUNK = 32  # two sub-blocks per chunk: short test sequences still span several chunks


def inputs(name, b, t, h, dk, dv, dtype, strong_decay=False):
  """Random q, k, v, log_g, initial state and cotangents (o, final state), seeded by name.
  With ``strong_decay`` a tenth of the gates are down to -20 and six consecutive steps
  forget at -20 in every dim, so G falls by 120 within one chunk: a naive factorization
  exp(G_i) · exp(-G_j) would overflow fp32."""
  keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 9)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
  q, k = normal(keys[0], (b, t, h, dk)), normal(keys[1], (b, t, h, dk))
  v = normal(keys[2], (b, t, h, dv))
  log_g = jax.nn.log_sigmoid(2.0 + 2.0 * normal(keys[3], (b, t, h, dk)))
  if strong_decay:
    strong = jax.random.uniform(keys[4], (b, t, h, dk)) < 0.1
    log_g = jnp.where(strong, -20.0 * jax.random.uniform(keys[5], (b, t, h, dk)), log_g)
    log_g = log_g.at[:, t // 3:t // 3 + 6].set(-20.0)
  state = normal(keys[6], (b, h, dk, dv))
  do, dstate = normal(keys[7], (b, t, h, dv)), normal(keys[8], (b, h, dk, dv))
  return tuple(x.astype(dtype) for x in (q, k, v, log_g, do)) + (state, dstate)


def assert_close(name, got, want, tol):
  got = np.asarray(got.astype(jnp.float32))
  assert np.all(np.isfinite(got)), f"{name} has NaN/Inf"
  scale = max(1.0, float(jnp.abs(want).max()))
  err = float(np.abs(got - np.asarray(want)).max())
  assert err <= tol * scale, f"{name}: max error {err} > {tol * scale}"


CASES = {
    # t = 129 over five chunks, dk != dv, a given scale, gates as strong as -20 a step.
    "strong": dict(b=2, t=129, h=1, dk=16, dv=32, dtype=jnp.float32, scale=0.3, with_state=True,
                   strong_decay=True),
    "bf16": dict(b=1, t=7, h=2, dk=32, dv=16, dtype=jnp.bfloat16, scale=None, with_state=True,
                 strong_decay=True),
    "single_step": dict(b=1, t=1, h=2, dk=16, dv=16, dtype=jnp.float32, scale=None, with_state=False,
                        strong_decay=False),
}


def case_inputs(case):
  c = CASES[case]
  q, k, v, log_g, do, state, dstate = inputs(case, c["b"], c["t"], c["h"], c["dk"], c["dv"],
                                             c["dtype"], c["strong_decay"])
  return (q, k, v, log_g, state if c["with_state"] else None), (do, dstate)


def vjp_of(fn, args, cotangents):
  """Outputs (o, final state) and the gradients of all five inputs, in one jit."""

  @jax.jit
  def run(args):
    out, vjp = jax.vjp(lambda *a: fn(*a[:4], initial_state=a[4]), *args)
    return out, vjp(cotangents)

  return run(args)


@functools.cache
def reference_results(case):
  args, (do, dstate) = case_inputs(case)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
  fn = functools.partial(gla_reference, scale=CASES[case]["scale"], return_final_state=True)
  return vjp_of(fn, tuple(f32(x) for x in args), (f32(do), dstate))


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(impl, case):
  """Outputs, final state and d(q, k, v, log_g, initial_state) under a random cotangent
  on both outputs."""
  args, cotangents = case_inputs(case)
  dtype = CASES[case]["dtype"]
  fn = functools.partial(gla, scale=CASES[case]["scale"], return_final_state=True,
                         chunk_size=CHUNK, **IMPLEMENTATIONS[impl])
  (o, final), grads = vjp_of(fn, args, cotangents)
  (ref_o, ref_final), ref_grads = reference_results(case)
  assert o.dtype == dtype and final.dtype == jnp.float32
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  names = ("o", "final_state", "dq", "dk", "dv", "dlog_g", "dinitial_state")
  for name, got, want in zip(names, (o, final, *grads), (ref_o, ref_final, *ref_grads)):
    if want is not None:
      assert got.shape == want.shape, name
      assert_close(name, got, want, tol)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_two_halves_carrying_the_state_equal_the_whole(impl):
  """Split off chunk boundaries: both parts are padded."""
  q, k, v, log_g, _, state, _ = inputs("halves", 1, 32, 2, 16, 16, jnp.float32)
  run = jax.jit(lambda *a, initial_state: gla(*a, initial_state=initial_state, chunk_size=16,
                                                return_final_state=True, **IMPLEMENTATIONS[impl]))
  whole, final = run(q, k, v, log_g, initial_state=state)
  first, mid = run(*(x[:, :13] for x in (q, k, v, log_g)), initial_state=state)
  second, end = run(*(x[:, 13:] for x in (q, k, v, log_g)), initial_state=mid)
  assert_close("o", jnp.concatenate([first, second], axis=1), whole, 1e-5)
  assert_close("final_state", end, final, 1e-5)


def test_default_implementation_on_cpu_is_the_xla_path():
  q, k, v, log_g, *_ = inputs("default", 1, 20, 1, 16, 16, jnp.float32)
  np.testing.assert_array_equal(gla(q, k, v, log_g, chunk_size=16),
                                gla(q, k, v, log_g, chunk_size=16, implementation="xla"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(implementation="triton"), "implementation='triton'"),
        (dict(implementation="pallas_interpret", interpret_backend="cpu"), "interpret_backend='cpu'"),
        (dict(chunk_size=48), "chunk_size=48"),
        (dict(chunk_size=8), "chunk_size=8"),
        (dict(scale=0.0), "scale=0.0"),
        (dict(initial_state=jnp.zeros((1, 2, 16, 8))), r"initial_state must be \[b, h, dk, dv\]"),
    ],
)
def test_bad_arguments(kwargs, message):
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match=message):
    gla(q, q, q, -q, **kwargs)


def test_bad_shapes():
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="log_g"):
    gla(q, q, q, q[..., :8])
  with pytest.raises(ValueError, match="v "):
    gla(q, q, q[:, :7], q)
  with pytest.raises(ValueError, match=r"\[batch, time, heads, dim\]"):
    gla(q[0], q[0], q[0], q[0])
