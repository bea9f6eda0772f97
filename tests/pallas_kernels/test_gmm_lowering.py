"""The gmm kernels lower for real hardware from this CPU (jax.export for TPU and CUDA,
forward and gradient, traced group sizes) at an MoE layer's shapes; they compile for
every target in test_compile_targets.py."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gmm.ops import gmm

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
M, K, N, G = 4096, 1024, 2048, 8


def forward(lhs, rhs, sizes):
  return gmm(lhs, rhs, sizes, implementation=None)


def gradient(lhs, rhs, sizes):
  return jax.grad(lambda a, b: forward(a, b, sizes).astype(jnp.float32).sum(), argnums=(0, 1))(lhs, rhs)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_forward_and_gradient_lower(platform, transpose_rhs):
  lhs = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((G, N, K) if transpose_rhs else (G, K, N), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((G,), jnp.int32)
  fwd = lambda a, b, s: gmm(a, b, s, transpose_rhs=transpose_rhs, implementation=None)  # noqa: E731
  grad = lambda a, b, s: jax.grad(lambda x, w: fwd(x, w, s).astype(jnp.float32).sum(), argnums=(0, 1))(a, b)  # noqa: E731
  counts = [jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=DISABLED)(lhs, rhs, sizes)
            .mlir_module().count(KERNEL_CALL[platform]) for f in (fwd, grad)]
  assert counts[0] >= 1 and counts[1] >= 2  # gmm; gmm for dlhs and tgmm for drhs


def test_default_lowers_to_the_blocked_xla_loop_on_cpu():
  lhs, rhs = jax.ShapeDtypeStruct((256, 64), jnp.float32), jax.ShapeDtypeStruct((4, 64, 32), jnp.float32)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  text = jax.jit(forward).lower(lhs, rhs, sizes).as_text()
  assert "custom_call" not in text and "while" in text
