"""Attention memory on CPU: XLA's compiled memory analysis of forward + backward for the
blocked `xla` path against the materializing reference, at t = 1k, 4k, 16k.

  python experiments/benchmarks/attention.py [--out=experiments/benchmarks/results]

Prints a table (sizes and the growth factor per 4x length: ~4 is linear, ~16 is
quadratic) and writes attention_memory.json beside it. Nothing is run, only compiled,
so the numbers do not depend on how busy the machine is.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths.")

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 2, 128


def compiled_bytes(fn, t: int) -> int:
  """Peak temporary + output bytes of jit(grad(fn)) at length t, from XLA's analysis."""
  q = jax.ShapeDtypeStruct((BATCH, t, HEADS, HEAD_DIM), jnp.float32)
  kv = jax.ShapeDtypeStruct((BATCH, t, KV_HEADS, HEAD_DIM), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v))  # noqa: E731
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def main(argv) -> None:
  del argv
  implementations = {
      "reference": lambda q, k, v: attention_reference(q, k, v, causal=True),
      "xla": lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="xla"),
  }
  rows = []
  for t in map(int, _LENGTHS.value):
    row = {"length": t, **{name: compiled_bytes(fn, t) for name, fn in implementations.items()}}
    rows.append(row)
  print(f"fwd+bwd memory, causal, b={BATCH} hq={HEADS} hkv={KV_HEADS} d={HEAD_DIM}, fp32 (MiB)")
  print(f"{'t':>7} {'reference':>12} {'xla':>10} {'ref/xla':>8} {'ref growth':>11} {'xla growth':>11}")
  for i, row in enumerate(rows):
    growth = ("", "")
    if i:
      growth = tuple(f"{row[k] / rows[i - 1][k]:.1f}x" for k in ("reference", "xla"))
    print(f"{row['length']:>7} {row['reference'] / 2**20:>12.1f} {row['xla'] / 2**20:>10.1f} "
          f"{row['reference'] / row['xla']:>8.1f} {growth[0]:>11} {growth[1]:>11}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "attention_memory.json").write_text(json.dumps(
      {"shape": dict(batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float32"),
       "backend": jax.default_backend(), "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
