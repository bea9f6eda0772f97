"""Registers and spills of the Pallas GPU kernels, from any machine: every case of
`jaxlab.aot.kernel_cases` (the kernels at the models' shapes, per-platform dispatch),
forward and gradient, compiled for H100 and A100 by XLA:GPU, with ptxas's numbers per
kernel read from XLA's log.

  python experiments/benchmarks/kernel_compile_report.py [--targets=h100,a100] [--cases=ssd_f32,...]

Prints a table (per Pallas kernel, and per XLA kernel that spills: registers, spill
store / load bytes, stack frame, static shared memory, and the program's compile time)
and writes kernel_compile_<targets>.json (every ptxas entry function) to --out. Nothing
runs, so the numbers do not depend on the machine; the compile times do. Spills are
reported, not errors.
"""

from __future__ import annotations

from jaxlab.aot import set_compile_environment

set_compile_environment(ptxas_log=True)

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxlab.aot.kernel_cases import CASES, PROGRAMS, compile_case  # noqa: E402
from jaxlab.aot.report import captured_stderr, pallas_kernels, ptxas_kernels  # noqa: E402
from jaxlab.aot.targets import get_target  # noqa: E402

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parent / "results"), "Output folder.")
_TARGETS = flags.DEFINE_list("targets", ["h100", "a100"], "GPU compile targets.")
_CASES = flags.DEFINE_list("cases", sorted(CASES), "Cases of jaxlab.aot.kernel_cases.")


def spills(kernel: dict[str, int]) -> bool:
  return bool(kernel["spill_store_bytes"] or kernel["spill_load_bytes"])


def print_row(target: str, case: str, program: str, seconds: float, kernels: dict) -> None:
  """The table's lines for one compiled program, one per kernel shown."""
  head = f"{target:6} {case:30} {program:8} {seconds:9.1f}"
  if not kernels:
    print(f"{head}  no Pallas kernel", flush=True)
  for kernel, v in kernels.items():
    print(f"{head}  {kernel:24} {v['registers']:>4} {v['spill_store_bytes']:>8} {v['spill_load_bytes']:>8} "
          f"{v['stack_frame_bytes']:>6} {v['static_shared_memory_bytes']:>6}", flush=True)
    head = " " * len(head)


def main(argv) -> None:
  del argv
  rows, ptxas = [], None
  print(f"{'target':6} {'case':30} {'program':8} {'compile s':>9}  {'kernel':24} {'regs':>4} "
        f"{'spill st':>8} {'spill ld':>8} {'stack':>6} {'smem':>6}")
  for name in _TARGETS.value:
    target = get_target(name)
    for case_name in _CASES.value:
      for program in PROGRAMS:
        with captured_stderr() as log:
          compiled, seconds = compile_case(CASES[case_name], program, target)
        ptxas = ptxas or re.search(r"ptxas with version (\S+)", log[0]).group(1)
        pallas = pallas_kernels(compiled.as_text())
        kernels = ptxas_kernels(log[0])
        rows.append({"target": name, "device_kind": target.devices[0].device_kind, "case": case_name,
                     "program": program, "compile_seconds": round(seconds, 2), "pallas_kernels": pallas,
                     "spilling_kernels": sorted(k for k, v in kernels.items() if spills(v)),
                     "kernels": kernels})
        shown = {k: v for k, v in kernels.items() if k in pallas or spills(v)}
        print_row(name, case_name, program, seconds, shown)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  cases = {name: [f"{jnp.dtype(dtype).name}{list(shape)}" for shape, dtype in CASES[name].inputs]
           for name in _CASES.value}
  (out / f"kernel_compile_{'_'.join(_TARGETS.value)}.json").write_text(json.dumps(
      {"jax": jax.__version__, "ptxas": ptxas, "case_inputs": cases, "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
