"""The SSD Pallas kernels lower for real hardware from this CPU: jax.export for TPU
(Mosaic) and CUDA (Pallas GPU), forward and gradient, at model-sized shapes."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ssd.ops import ssd

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Pallas GPU kernels are serialized as Triton custom calls, which carry no export
# compatibility guarantee; the lowering itself is what this test checks.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

# (heads, groups, head_dim, state, chunk): Mamba-2's defaults, and a small state with groups.
SHAPES = {"mamba2": (8, 1, 64, 128, 256), "small_state_groups": (4, 2, 64, 16, 64)}


def export(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


def arguments(b, t, h, g, p, n, dtype):
  s = jax.ShapeDtypeStruct
  return (s((b, t, h, p), dtype), s((b, t, h), dtype), s((h,), jnp.float32), s((b, t, g, n), dtype),
          s((b, t, g, n), dtype), s((h,), jnp.float32), s((b, h, p, n), jnp.float32))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("implementation", ["pallas", None])
def test_forward_and_gradient_lower(platform, dtype, shape, implementation):
  h, g, p, n, chunk = SHAPES[shape]
  args = arguments(2, 2048, h, g, p, n, dtype)

  def forward(x, dt, A, B, C, D, s0):
    return ssd(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk, return_final_state=True,
               implementation=implementation)

  def grad(*args):
    loss = lambda *a: sum(v.astype(jnp.float32).sum() for v in forward(*a))  # noqa: E731
    return jax.grad(loss, argnums=tuple(range(7)))(*args)

  assert export(forward, platform, *args).mlir_module().count(KERNEL_CALL[platform]) >= 1
  assert export(grad, platform, *args).mlir_module().count(KERNEL_CALL[platform]) >= 2  # fwd, bwd


def test_default_lowers_to_plain_xla_on_cpu():
  args = arguments(1, 256, 4, 1, 64, 16, jnp.float32)[:5]
  text = export(lambda *a: ssd(*a), "cpu", *args).mlir_module()
  assert "tpu_custom_call" not in text and "triton" not in text
