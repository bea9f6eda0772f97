"""MoE FFN speed on CPU: forward + backward time of jaxlab's ``moe`` layer against a dense
SwiGLU FFN with the same active FLOPs (width k x the expert width), at 8192 tokens,
d_model 512, 8 experts of width 1024, top-2; dropless against capacity dispatch; and the
blocked XLA grouped matmul against `jax.lax.ragged_dot` inside the layer.

  python experiments/benchmarks/moe.py [--out=experiments/benchmarks/results]

The variants run interleaved, best of --repeats, so a busy machine slows them alike; the
backward pass gets a random cotangent, as in training. The target for the default
(dropless, XLA grouped matmul) is at most 1.25 x the dense FFN. Writes moe_speed.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx
from moe_case import DENSE, SHAPE, inputs, make_layer
from timing import forward_backward


_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant (best is kept).")

VARIANTS = {
    DENSE: None,
    "moe dropless, xla gmm": dict(moe_dispatch="dropless", moe_gmm_impl="xla"),
    "moe dropless, ragged_dot": dict(moe_dispatch="dropless", moe_gmm_impl="ragged_dot"),
    "moe capacity 1.25": dict(moe_dispatch="capacity", moe_capacity_factor=1.25),
}


def step(overrides):
  """The layer's jitted forward + backward in its parameters and input."""
  graphdef, params = nnx.split(make_layer(overrides))
  fn = forward_backward(lambda p, x: nnx.merge(graphdef, p)(x), params, inputs())
  return lambda x: fn(params, x)


def main(_):
  x = inputs()
  steps = {name: step(overrides) for name, overrides in VARIANTS.items()}
  for fn in steps.values():
    jax.block_until_ready(fn(x))
  best = {name: float("inf") for name in steps}
  for _ in range(_REPEATS.value):
    for name, fn in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      best[name] = min(best[name], time.perf_counter() - start)
  dense = best[DENSE]
  rows = [{"variant": name, "seconds": s, "ratio_to_dense": s / dense} for name, s in best.items()]
  print(f"{'variant':38s} {'fwd+bwd s':>10s} {'÷ dense':>8s}")
  for row in rows:
    print(f"{row['variant']:38s} {row['seconds']:10.3f} {row['ratio_to_dense']:8.2f}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  record = {"shape": SHAPE, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "repeats": _REPEATS.value, "rows": rows}
  (out / "moe_speed.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
