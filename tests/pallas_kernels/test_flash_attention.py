"""Flash attention: every implementation against the fp32 reference, forward and all
three gradients, over masks, GQA ratios, odd lengths, head dims and dtypes."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.ops import BlockSizes, flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

# Small tiles so that short test sequences still span several blocks.
SMALL = BlockSizes(tpu=tpu.BlockSizes(128, 128, 128, 128), gpu=gpu.BlockSizes(32, 32, 16, 32),
                   xla_block_k=32)
IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "tpu_interpret": dict(implementation="pallas_interpret", interpret_backend="tpu"),
    "gpu_interpret": dict(implementation="pallas_interpret", interpret_backend="gpu"),
}


def inputs(name, b, t, s, hq, hkv, d, dtype, segments, dv=None):
  """Fresh random inputs, seeded by the test case."""
  dv = d if dv is None else dv
  keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 6)
  q = jax.random.normal(keys[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, hkv, dv), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[3], (b, t, hq, dv), jnp.float32).astype(dtype)
  seg = None
  if segments:  # packed documents: 3 segments, sorted, queries aligned with the last t keys
    kv_seg = jnp.sort(jax.random.randint(keys[4], (b, s), 0, 3), axis=1)
    seg = (kv_seg[:, s - t:], kv_seg)
  return q, k, v, dout, seg


def check(case, impl, *, b=2, t=130, s=None, hq=4, hkv=2, d=64, dv=None, dtype=jnp.float32,
          segments=False, alibi=False, **mask):
  s = t if s is None else s
  q, k, v, dout, seg = inputs(case, b, t, s, hq, hkv, d, dtype, segments, dv)
  slopes = 2.0 ** (-8.0 * jnp.arange(1, hq + 1) / hq) if alibi else None
  kw = dict(segment_ids=seg, alibi_slopes=slopes, **mask)
  out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=SMALL, **kw,
                                                      **IMPLEMENTATIONS[impl]), q, k, v)
  grads = vjp(dout)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), f32(q), f32(k), f32(v))
  ref_grads = ref_vjp(f32(dout))
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    assert got.shape == want.shape and got.dtype == dtype, name
    got = np.asarray(f32(got))
    assert np.all(np.isfinite(got)), f"{name} has NaN/Inf"
    scale = max(1.0, float(jnp.abs(want).max()))
    err = float(np.abs(got - np.asarray(want)).max())
    assert err <= tol * scale, f"{name}: max error {err} > {tol * scale}"


MASKS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(causal=True, sliding_window=17),
    "window_noncausal": dict(sliding_window=40),
    "segments": dict(causal=True, segments=True),
    "softcap": dict(causal=True, logit_soft_cap=2.5),
    "softcap_scale": dict(logit_soft_cap=4.0, scale=0.3),
    "alibi": dict(causal=True, alibi=True),
    "alibi_bidirectional_window": dict(alibi=True, sliding_window=30, segments=True),
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_masks(impl, mask):
  check(f"mask-{mask}", impl, **MASKS[mask])


def test_reference_equals_a_loop_over_query_key_pairs():
  """The reference against the definition written per (head, query, key) in numpy:
  ALiBi distance, soft cap, window, causality, GQA head mapping, decode offset."""
  rng = np.random.default_rng(7)
  b, t, s, hq, hkv, d, cap, window, scale = 1, 5, 9, 4, 2, 3, 3.0, 6, 0.7
  q, k, v = (rng.normal(size=shape).astype(np.float32)
             for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
  slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
  want = np.zeros((b, t, hq, d))
  for h in range(hq):
    kv = h // (hq // hkv)
    for i in range(t):
      pos = i + s - t
      keys = [j for j in range(s) if j <= pos and pos - j < window]
      logits = np.array([scale * q[0, i, h] @ k[0, j, kv] - slopes[h] * abs(pos - j) for j in keys])
      logits = cap * np.tanh(logits / cap)
      w = np.exp(logits - logits.max())
      want[0, i, h] = (w / w.sum()) @ v[0, keys, kv]
  got = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
                            sliding_window=window, logit_soft_cap=cap, scale=scale,
                            alibi_slopes=jnp.asarray(slopes))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("t, s", [(1, 1), (7, 7), (257, 257), (7, 130), (1, 257)])
def test_odd_lengths_and_decoding_offsets(impl, t, s):
  check(f"len-{t}-{s}", impl, t=t, s=s, d=128, hq=4, hkv=1, causal=True)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gqa_ratios(impl, ratio):
  check(f"gqa-{ratio}", impl, t=33, hq=8, hkv=8 // ratio, causal=True, sliding_window=9)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("mask", ["causal", "segments", "softcap", "alibi"])
def test_bfloat16(impl, mask):
  check(f"bf16-{mask}", impl, dtype=jnp.bfloat16, d=128, **MASKS[mask])


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_values_wider_than_keys(impl):
  """v may carry more features than q and k (TAPE attends over [v, cos, sin])."""
  check("wide-v", impl, t=70, d=64, dv=192, hq=2, hkv=2, causal=True)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_one_head_batch_one(impl):
  check("single", impl, b=1, t=40, hq=1, hkv=1, d=64, causal=True)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_query_that_sees_nothing_returns_zeros(impl):
  """Queries of a segment with no keys in view: zero output, finite zero gradients."""
  b, t, h, d = 1, 16, 2, 64
  keys = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(key, (b, t, h, d)) for key in keys)
  q_seg = jnp.concatenate([jnp.zeros((b, 8), jnp.int32), jnp.full((b, 8), 5, jnp.int32)], 1)
  kv_seg = jnp.zeros((b, t), jnp.int32)
  f = lambda q, k, v: flash_attention(q, k, v, segment_ids=(q_seg, kv_seg), block_sizes=SMALL,  # noqa: E731
                                      **IMPLEMENTATIONS[impl])
  out = f(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[:, 8:]), 0.0)
  dq = jax.grad(lambda q: f(q, k, v).sum())(q)
  assert np.all(np.isfinite(np.asarray(dq)))
  np.testing.assert_array_equal(np.asarray(dq[:, 8:]), 0.0)


def test_default_implementation_on_cpu_is_the_xla_path():
  q, k, v, _, _ = inputs("default", 1, 64, 64, 2, 1, 64, jnp.float32, False)
  np.testing.assert_allclose(flash_attention(q, k, v, causal=True),
                             flash_attention(q, k, v, causal=True, implementation="xla"), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(logit_soft_cap=-1.0), "logit_soft_cap=-1.0"),
        (dict(implementation="triton"), "implementation='triton'"),
        (dict(alibi_slopes=jnp.ones(3)), "alibi_slopes must be"),
        (dict(implementation="pallas_interpret", interpret_backend="cpu"), "interpret_backend='cpu'"),
    ],
)
def test_bad_arguments(kwargs, message):
  q = jnp.ones((1, 8, 4, 16))
  with pytest.raises(ValueError, match=message):
    flash_attention(q, q[:, :, :2], q[:, :, :2], **kwargs)


def test_bad_shapes():
  q = jnp.ones((1, 8, 3, 16))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_attention(q, q[:, :, :2], q[:, :, :2])
  with pytest.raises(ValueError, match="segment_ids"):
    flash_attention(q, q, q, segment_ids=(jnp.zeros((1, 7), jnp.int32), jnp.zeros((1, 8), jnp.int32)))
