"""On a GPU, one command under 5 minutes: check the Triton grouped matmuls against the
reference (forward and both gradients), then time the MoE FFN forward + backward (bf16,
8192 tokens, d_model 512, 8 experts of width 1024, top-2) against a dense SwiGLU FFN of
equal active FLOPs, dropless against capacity dispatch, and the Pallas gmm against
`jax.lax.ragged_dot`, in TFLOP/s of active FLOPs.

  python experiments/benchmarks/moe_gpu.py --out=$OUT

Prints the table and writes moe_gpu.json to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from moe_case import DENSE, SHAPE, inputs, make_layer
from timing import forward_backward, median_seconds

from pallas_kernels.gmm.ops import gmm
from pallas_kernels.gmm.reference import gmm_reference

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")

VARIANTS = {
    DENSE: None,
    "moe dropless, pallas gmm": dict(moe_dispatch="dropless", moe_gmm_impl="pallas"),
    "moe dropless, ragged_dot": dict(moe_dispatch="dropless", moe_gmm_impl="ragged_dot"),
    "moe dropless, xla gmm": dict(moe_dispatch="dropless", moe_gmm_impl="xla"),
    "moe capacity 1.25": dict(moe_dispatch="capacity", moe_capacity_factor=1.25),
}


def check_against_reference() -> dict:
  keys = jax.random.split(jax.random.key(0), 3)
  sizes = jnp.asarray([300, 0, 1, 517, 129, 64, 700, 200], jnp.int32)
  lhs = jax.random.normal(keys[0], (2048, 512), jnp.bfloat16)
  rhs = (jax.random.normal(keys[1], (8, 512, 384), jnp.float32) / 512**0.5).astype(jnp.bfloat16)
  dout = jax.random.normal(keys[2], (2048, 384), jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  got, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, implementation="pallas"), lhs, rhs)
  want, want_vjp = jax.vjp(lambda a, b: gmm_reference(a, b, sizes), f32(lhs), f32(rhs))
  errors = {}
  for name, g, w in zip(("out", "dlhs", "drhs"), (got, *vjp(dout)), (want, *want_vjp(f32(dout)))):
    scale = max(1.0, float(jnp.abs(w).max()))
    errors[name] = float(jnp.abs(f32(g) - w).max()) / scale
    assert np.isfinite(errors[name]) and errors[name] < 2e-2, (name, errors[name])
  return errors


def step(overrides):
  graphdef, params = nnx.split(make_layer(overrides))
  x = inputs()
  fn = forward_backward(lambda p, x: nnx.merge(graphdef, p)(x.astype(jnp.bfloat16)), params, x)
  return lambda x: fn(params, x)


def main(_):
  errors = check_against_reference()
  print("gmm (Triton) against the reference, max relative error:", errors)
  x = inputs()
  tokens = SHAPE["batch"] * SHAPE["seq_len"]
  active_flops = 3 * 2 * tokens * 3 * SHAPE["d_model"] * SHAPE["expert_dim"] * SHAPE["top_k"]  # fwd + bwd
  rows = []
  for name, overrides in VARIANTS.items():
    seconds = median_seconds(step(overrides), x)
    rows.append({"variant": name, "seconds": seconds, "tflops": active_flops / seconds / 1e12})
  dense = rows[0]["seconds"]
  print(f"{'variant':38s} {'fwd+bwd ms':>10s} {'TFLOP/s':>8s} {'÷ dense':>8s}")
  for row in rows:
    row["ratio_to_dense"] = row["seconds"] / dense
    print(f"{row['variant']:38s} {1e3 * row['seconds']:10.2f} {row['tflops']:8.1f} {row['ratio_to_dense']:8.2f}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  record = {"shape": SHAPE, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "check": errors, "rows": rows}
  (out / "moe_gpu.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
