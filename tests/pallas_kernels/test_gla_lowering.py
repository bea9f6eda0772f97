"""The GLA Pallas kernels lower for real hardware from this CPU: jax.export for TPU
(Mosaic) and CUDA (Pallas GPU), forward and gradient, at model-sized shapes."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gla.ops import gla

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Pallas GPU kernels are serialized as Triton custom calls, which carry no export
# compatibility guarantee; the lowering itself is what this test checks.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


def shapes(dtype, b=2, t=2048, h=4, dk=128, dv=128):
  qk = jax.ShapeDtypeStruct((b, t, h, dk), dtype)
  return qk, jax.ShapeDtypeStruct((b, t, h, dv), dtype), jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)


def lower_both(platform, implementation, qk, v, state):
  """Kernel calls in the lowered forward and in the lowered gradient of all inputs."""

  def forward(q, k, v, log_g, state):
    return gla(q, k, v, log_g, initial_state=state, return_final_state=True,
               implementation=implementation)

  def grad(q, k, v, log_g, state):
    def loss(*args):
      o, final = forward(*args)
      return o.astype(jnp.float32).sum() + final.sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, log_g, state)

  call = KERNEL_CALL[platform]
  fwd = export(forward, platform, qk, qk, v, qk, state).mlir_module().count(call)
  bwd = export(grad, platform, qk, qk, v, qk, state).mlir_module().count(call)
  return fwd, bwd


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", ["pallas", None])
def test_forward_and_gradient_lower(platform, dtype, implementation):
  fwd, bwd = lower_both(platform, implementation, *shapes(dtype))
  assert fwd >= 1 and bwd >= 2  # forward; forward and backward


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_narrow_keys_and_odd_chunk_count_lower(platform):
  """fla's GLA layer shape, keys half as wide as values (expand_k = 0.5), over 33 chunks."""
  fwd, bwd = lower_both(platform, "pallas", *shapes(jnp.bfloat16, t=2100, h=8, dk=64, dv=128))
  assert fwd >= 1 and bwd >= 2


def test_default_lowers_to_plain_xla_on_cpu():
  qk, v, state = shapes(jnp.float32, t=256)
  text = export(lambda q, v: gla(q, q, v, -jnp.abs(q)), "cpu", qk, v).mlir_module()
  assert "tpu_custom_call" not in text and "triton" not in text
