"""The Pallas kernels lower for real hardware from this CPU: jax.export for TPU (Mosaic)
and CUDA (Pallas GPU), forward and gradient, at model-sized shapes."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention.ops import flash_attention

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Pallas GPU kernels are serialized as Triton custom calls, which carry no export
# compatibility guarantee; the lowering itself is what this test checks.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

VARIANTS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(causal=True, sliding_window=512),
    "segments": dict(causal=True, segments=True),
    "softcap": dict(causal=True, logit_soft_cap=30.0),
    "alibi": dict(causal=True, alibi=True),
}


def export(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("implementation", ["pallas", None])
def test_forward_and_gradient_lower(platform, variant, dtype, heads, implementation):
  hq, hkv = heads
  kwargs = dict(VARIANTS[variant])
  segments = kwargs.pop("segments", False)
  if kwargs.pop("alibi", False):
    kwargs["alibi_slopes"] = 2.0 ** (-8.0 * jnp.arange(1, hq + 1) / hq)
  t, d = 2048, 128
  q = jax.ShapeDtypeStruct((2, t, hq, d), dtype)
  kv = jax.ShapeDtypeStruct((2, t, hkv, d), dtype)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def forward(q, k, v, seg):
    return flash_attention(q, k, v, segment_ids=(seg, seg) if segments else None,
                           implementation=implementation, **kwargs)

  def grad(q, k, v, seg):
    return jax.grad(lambda *a: forward(*a, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  fwd_text = export(forward, platform, q, kv, kv, seg).mlir_module()
  assert fwd_text.count(KERNEL_CALL[platform]) >= 1
  grad_text = export(grad, platform, q, kv, kv, seg).mlir_module()
  assert grad_text.count(KERNEL_CALL[platform]) >= 3  # forward, dq, dk/dv


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_head_dim_64_and_decode_shapes_lower(platform):
  q = jax.ShapeDtypeStruct((4, 1, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 4096, 2, 64), jnp.bfloat16)
  text = export(lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="pallas"),
                platform, q, kv, kv).mlir_module()
  assert KERNEL_CALL[platform] in text


def test_default_lowers_to_plain_xla_on_cpu():
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.float32)
  text = export(lambda q: flash_attention(q, q, q, causal=True), "cpu", q).mlir_module()
  assert "tpu_custom_call" not in text and "triton" not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_wide_values_lower(platform):
  """TAPE's shape: values carry [v, cos, sin], three times the key width."""
  q = jax.ShapeDtypeStruct((2, 1024, 8, 64), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, 1024, 8, 192), jnp.bfloat16)

  def grad(q, v):
    loss = lambda q, v: flash_attention(q, q, v, causal=True, implementation="pallas").astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(q, v)

  assert export(grad, platform, q, v).mlir_module().count(KERNEL_CALL[platform]) >= 3
