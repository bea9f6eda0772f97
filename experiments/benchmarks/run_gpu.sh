#!/usr/bin/env bash
# On a GPU host, one command: each *_gpu.py first checks its Pallas GPU kernels against
# the references (forward and gradients, the real kernels, not interpret mode), then
# times them; the JSON goes to $OUT (default: experiments/benchmarks/results). Each
# script gets at most 5 minutes; one that fails or runs over is reported and the next
# one runs.
#   OUT=/tmp/out bash experiments/benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/benchmarks/results}
mkdir -p "$OUT"
python -c "import jax; print(jax.__version__, jax.devices())"
status=0
for bench in moe_gpu attention_gpu scan_gpu; do
  echo "== $bench"
  if ! JAX_PLATFORMS=cuda timeout 300 python "experiments/benchmarks/$bench.py" --out="$OUT"; then
    echo "== $bench FAILED (or ran past 5 minutes)"
    status=1
  fi
done
exit $status
