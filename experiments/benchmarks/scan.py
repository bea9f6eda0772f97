"""Scan speed on CPU: forward + backward time of selective_scan (sequential, associative,
chunked), ssd and gla (chunked against sequential) at t = 1k, 4k, 16k.

  python experiments/benchmarks/scan.py [--out=experiments/benchmarks/results]

Implementations of one kernel run interleaved, best of --repeats, so that a busy
machine slows them alike; the backward pass gets a random cotangent, as in training; the table gives each one's time and its speedup over the
sequential scan. Writes scan_speed.json beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from timing import forward_backward

from pallas_kernels.gla.ops import gla
from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per implementation (best is kept).")
_KERNELS = flags.DEFINE_list("kernels", ["selective_scan", "ssd", "gla"], "Kernels to time.")

# A training batch of one layer of a d_model = 128 model: Mamba-1's d_inner channels with
# state N; Mamba-2's and GLA's heads of width P (values) and N (keys).
SCAN = dict(batch=4, channels=256, state=16)
SSD = dict(batch=4, heads=4, head_dim=64, state=64, chunk=64)
GLA = dict(batch=4, heads=4, key_dim=64, value_dim=64, chunk=64)


def selective_scan_case(t: int):
  b, d, n = SCAN["batch"], SCAN["channels"], SCAN["state"]
  keys = jax.random.split(jax.random.key(t), 5)
  args = (jax.random.normal(keys[0], (b, t, d)), jax.random.normal(keys[1], (b, t, d)) - 2.0,
          -jnp.exp(jax.random.normal(keys[2], (d, n))), jax.random.normal(keys[3], (b, t, n)),
          jax.random.normal(keys[4], (b, t, n)))

  def run(implementation):
    return lambda u, delta, A, B, C: selective_scan(u, delta, A, B, C, delta_softplus=True,
                                                    implementation=implementation)

  return args, {name: run(name) for name in ("sequential", "associative", "xla")}


def ssd_case(t: int):
  b, h, p, n = SSD["batch"], SSD["heads"], SSD["head_dim"], SSD["state"]
  keys = jax.random.split(jax.random.key(t), 5)
  args = (jax.random.normal(keys[0], (b, t, h, p)), jax.nn.softplus(jax.random.normal(keys[1], (b, t, h)) - 2.0),
          -jnp.exp(jax.random.normal(keys[2], (h,))), jax.random.normal(keys[3], (b, t, 1, n)),
          jax.random.normal(keys[4], (b, t, 1, n)))

  def run(implementation):
    return lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=SSD["chunk"], implementation=implementation)

  return args, {name: run(name) for name in ("sequential", "xla")}


def gla_case(t: int):
  b, h, dk, dv = GLA["batch"], GLA["heads"], GLA["key_dim"], GLA["value_dim"]
  keys = jax.random.split(jax.random.key(t), 4)
  args = (jax.random.normal(keys[0], (b, t, h, dk)), jax.random.normal(keys[1], (b, t, h, dk)),
          jax.random.normal(keys[2], (b, t, h, dv)),
          jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h, dk))) / 16)

  def run(implementation):
    return lambda q, k, v, g: gla(q, k, v, g, chunk_size=GLA["chunk"], implementation=implementation)

  return args, {name: run(name) for name in ("sequential", "xla")}


def time_side_by_side(args, implementations: dict, repeats: int) -> dict[str, float]:
  """Best wall time per implementation, the calls interleaved."""
  compiled = {name: forward_backward(fn, *args) for name, fn in implementations.items()}
  for step in compiled.values():
    jax.block_until_ready(step(*args))
  best = {name: float("inf") for name in compiled}
  for _ in range(repeats):
    for name, step in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def main(argv) -> None:
  del argv
  cases = {"selective_scan": selective_scan_case, "ssd": ssd_case, "gla": gla_case}
  rows = []
  for kernel in _KERNELS.value:
    for t in map(int, _LENGTHS.value):
      args, implementations = cases[kernel](t)
      seconds = time_side_by_side(args, implementations, _REPEATS.value)
      rows.append({"kernel": kernel, "length": t, "seconds": seconds})
      speedups = "  ".join(f"{name} {seconds['sequential'] / s:5.1f}x" for name, s in seconds.items()
                           if name != "sequential")
      times = "  ".join(f"{name} {s * 1e3:8.1f} ms" for name, s in seconds.items())
      print(f"{kernel:>15} t={t:>6}  {times}   speedup over sequential: {speedups}", flush=True)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "scan_speed.json").write_text(json.dumps(
      {"shapes": {"selective_scan": SCAN, "ssd": SSD, "gla": GLA}, "dtype": "float32",
       "backend": jax.default_backend(), "cpu_count": jax.local_device_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
