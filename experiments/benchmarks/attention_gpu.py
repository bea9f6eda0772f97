"""On a GPU, one command under 5 minutes: check the Pallas GPU flash-attention kernel
against the fp32 reference (forward and gradients), then time forward and
forward + backward against jax.nn.dot_product_attention (XLA and cuDNN) in TFLOP/s,
causal, head_dim 128, bf16, t = 1k..16k.

  python experiments/benchmarks/attention_gpu.py --out=$OUT

Prints a table and writes attention_gpu.json to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import median_seconds

from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
HEADS, KV_HEADS, HEAD_DIM, TOKENS = 16, 16, 128, 16384  # batch = TOKENS // t


def check_against_reference() -> dict:
  keys = jax.random.split(jax.random.key(0), 4)
  shape_q, shape_kv = (2, 1024, 8, HEAD_DIM), (2, 1024, 2, HEAD_DIM)
  q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
  k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
  v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
  do = jax.random.normal(keys[3], shape_q, jnp.bfloat16)
  errors = {}
  for name, kw in {"causal": dict(causal=True), "window": dict(causal=True, sliding_window=256)}.items():
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, implementation="pallas", **kw), q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), f32(q), f32(k), f32(v))
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *vjp(do)), (ref, *ref_vjp(f32(do)))):
      err = float(jnp.abs(f32(got) - want).max() / max(1.0, float(jnp.abs(want).max())))
      errors[f"{name}/{label}"] = err
      if not np.isfinite(err) or err > 2e-2:
        raise AssertionError(f"{name} {label}: relative error {err} > 2e-2")
  return errors


IMPLEMENTATIONS = {
    "pallas": lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="pallas"),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
}


def main(argv) -> None:
  del argv
  print("device:", jax.devices()[0].device_kind)
  errors = check_against_reference()
  print("max relative error vs reference:", {k: f"{v:.1e}" for k, v in errors.items()})
  rows = []
  for t in map(int, _LENGTHS.value):
    b = max(1, TOKENS // t)
    keys = jax.random.split(jax.random.key(t), 3)
    q, k, v = (jax.random.normal(key, (b, t, HEADS, HEAD_DIM), jnp.bfloat16) for key in keys)
    fwd_flops = 4 * b * HEADS * t * t * HEAD_DIM / 2  # causal: half the square
    row = {"length": t, "batch": b}
    for name, fn in IMPLEMENTATIONS.items():
      forward = jax.jit(fn)
      train = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
      try:
        row[f"{name}_fwd_tflops"] = fwd_flops / median_seconds(forward, q, k, v) / 1e12
        row[f"{name}_fwd_bwd_tflops"] = 3.5 * fwd_flops / median_seconds(train, q, k, v) / 1e12
      except Exception as e:  # e.g. XLA running out of memory materializing t x t scores
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
    print(json.dumps(row))
  print(f"\n{'t':>6} " + " ".join(f"{n + ' fwd':>11} {n + ' f+b':>11}" for n in IMPLEMENTATIONS) + "  (TFLOP/s)")
  for row in rows:
    cells = []
    for n in IMPLEMENTATIONS:
      cells += [f"{row.get(f'{n}_fwd_tflops', float('nan')):>11.1f}",
                f"{row.get(f'{n}_fwd_bwd_tflops', float('nan')):>11.1f}"]
    print(f"{row['length']:>6} " + " ".join(cells))
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "attention_gpu.json").write_text(json.dumps(
      {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "errors": errors,
       "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16", "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
