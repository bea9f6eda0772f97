"""On a GPU, one command under 5 minutes: check the Pallas GPU kernels of selective_scan,
ssd and gla against their fp32 sequential references (outputs and gradients), then time
forward and forward + backward of the Pallas kernels against the chunked XLA paths (and
the associative scan for selective_scan), bf16, t = 1k..16k.

  python experiments/benchmarks/scan_gpu.py --out=$OUT

Prints a table and writes scan_gpu.json to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import forward_backward, median_seconds

from pallas_kernels.gla.ops import gla
from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths.")
TOKENS = 32768  # batch = TOKENS // t


def inputs(kernel: str, b: int, t: int, dtype):
  """Model-sized inputs: Mamba-1 (d_inner 1536, N 16), Mamba-2 (24 heads x 64, N 128),
  GLA (8 heads, 128 x 128)."""
  keys = jax.random.split(jax.random.key(t), 5)
  normal = lambda i, shape: jax.random.normal(keys[i], shape, jnp.float32).astype(dtype)  # noqa: E731
  if kernel == "selective_scan":
    d, n = 1536, 16
    return (normal(0, (b, t, d)), normal(1, (b, t, d)) - 2.0, -jnp.exp(jax.random.normal(keys[2], (d, n))),
            normal(3, (b, t, n)), normal(4, (b, t, n)))
  if kernel == "ssd":
    h, p, n = 24, 64, 128
    return (normal(0, (b, t, h, p)), jax.nn.softplus(jax.random.normal(keys[1], (b, t, h)) - 2.0),
            -jnp.exp(jax.random.normal(keys[2], (h,))), normal(3, (b, t, 1, n)), normal(4, (b, t, 1, n)))
  h, dk, dv = 8, 128, 128
  return (normal(0, (b, t, h, dk)), normal(1, (b, t, h, dk)), normal(2, (b, t, h, dv)),
          (jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h, dk))) / 16).astype(dtype))


def call(kernel: str, implementation: str):
  if kernel == "selective_scan":
    return lambda u, dl, A, B, C: selective_scan(u, dl, A, B, C, delta_softplus=True, implementation=implementation)
  if kernel == "ssd":
    return lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=64, implementation=implementation)
  return lambda q, k, v, g: gla(q, k, v, g, implementation=implementation)


def check_against_reference() -> dict:
  errors = {}
  for kernel in ("selective_scan", "ssd", "gla"):
    args = inputs(kernel, 2, 1000, jnp.float32)
    cot = jax.random.normal(jax.random.key(1), call(kernel, "sequential")(*args).shape)
    got, vjp = jax.vjp(call(kernel, "pallas"), *args)
    want, ref_vjp = jax.vjp(call(kernel, "sequential"), *args)
    for i, (g, w) in enumerate(zip((got, *vjp(cot)), (want, *ref_vjp(cot)))):
      err = float(jnp.abs(g - w).max() / max(1.0, float(jnp.abs(w).max())))
      errors[f"{kernel}/{'out' if i == 0 else f'grad{i - 1}'}"] = err
      if not np.isfinite(err) or err > 2e-3:
        raise AssertionError(f"{kernel} output/grad {i}: relative error {err} > 2e-3")
  return errors


def main(argv) -> None:
  del argv
  errors = check_against_reference()
  print("max relative error against the fp32 reference:", json.dumps(errors, indent=1))
  implementations = {"selective_scan": ("pallas", "xla", "associative"), "ssd": ("pallas", "xla"),
                     "gla": ("pallas", "xla")}
  rows = []
  for kernel, names in implementations.items():
    for t in map(int, _LENGTHS.value):
      args = inputs(kernel, max(1, TOKENS // t), t, jnp.bfloat16)
      row = {"kernel": kernel, "length": t, "batch": max(1, TOKENS // t)}
      for name in names:
        fn = call(kernel, name)
        row[f"{name}_fwd_ms"] = 1e3 * median_seconds(jax.jit(fn), *args)
        row[f"{name}_fwd_bwd_ms"] = 1e3 * median_seconds(forward_backward(fn, *args), *args)
      rows.append(row)
      print(json.dumps(row), flush=True)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "scan_gpu.json").write_text(json.dumps(
      {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "errors": errors, "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
