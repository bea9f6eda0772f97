"""The Pallas kernels lower for real hardware from this CPU: jax.export for TPU (Mosaic)
and CUDA (Pallas GPU), forward and gradient, at model-sized shapes."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan.ops import selective_scan

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Pallas GPU kernels are serialized as Triton custom calls, which carry no export
# compatibility guarantee; the lowering itself is what this test checks.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype, groups", [(jnp.float32, None), (jnp.bfloat16, 4)])
@pytest.mark.parametrize("implementation", ["pallas", None])
def test_forward_and_gradient_lower(platform, dtype, groups, implementation):
  """Mamba-130m-like sizes: d_inner 1536, d_state 16, t 2048, with every option on."""
  b, t, d, n = 2, 2048, 1536, 16
  rows = jax.ShapeDtypeStruct((b, t, d), dtype)
  bc = jax.ShapeDtypeStruct((b, t, n) if groups is None else (b, t, groups, n), dtype)
  A = jax.ShapeDtypeStruct((d, n), jnp.float32)
  vec = jax.ShapeDtypeStruct((d,), jnp.float32)
  state = jax.ShapeDtypeStruct((b, d, n), jnp.float32)

  def forward(u, delta, z, A, B, C, D, bias, x0):
    y, final = selective_scan(u, delta, A, B, C, D, z, bias, True, x0, True, implementation)
    return y.astype(jnp.float32).sum() + final.sum()

  args = (rows, rows, rows, A, bc, bc, vec, vec, state)
  fwd_text = export(forward, platform, *args).mlir_module()
  assert fwd_text.count(KERNEL_CALL[platform]) >= 1
  grad = jax.grad(forward, argnums=tuple(range(9)))
  grad_text = export(grad, platform, *args).mlir_module()
  assert grad_text.count(KERNEL_CALL[platform]) >= 2  # forward and backward


def test_default_lowers_to_plain_xla_on_cpu():
  u = jax.ShapeDtypeStruct((1, 256, 64), jnp.float32)
  A = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  B = jax.ShapeDtypeStruct((1, 256, 16), jnp.float32)
  text = export(lambda u, A, B: selective_scan(u, u, A, B, B), "cpu", u, A, B).mlir_module()
  assert "tpu_custom_call" not in text and "triton" not in text
