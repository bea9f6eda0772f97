"""Compile a run's jitted steps for a target and report what the compiler says about
them: per-device memory against the device's HBM, compile time, the collectives and
Pallas kernels in the compiled program, and (GPU) each kernel's registers and spills."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax

from jaxlab.aot.targets import Target
from jaxlab.sharding import use_mesh
from jaxlab.train.build import RunSetup

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
MEMORY_KNOBS = (
    "To lower the memory per device: recompute activations (--config.model.remat=full, or "
    "save_dots), shard the state over more devices (--config.sharding.strategy=fsdp with a larger "
    "--config.mesh.fsdp), shrink the per-device batch (--config.data.batch_size) or split it into "
    "micro-batches (--config.train.grad_accum=N), or compute in bfloat16 "
    "(--config.train.compute_dtype=bfloat16)."
)


class DoesNotFitError(RuntimeError):
  """The compiled program needs more memory per device than the target has."""


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of ``tree``'s sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def collectives(hlo: str) -> dict[str, int]:
  """How many of each collective the compiled HLO runs (async pairs counted once)."""
  return {name: len(re.findall(rf"= [^\n]*? {name}(?:-start)?\(", hlo)) for name in COLLECTIVES}


def pallas_kernels(hlo: str) -> dict[str, int]:
  """Pallas kernels compiled into the program (Mosaic TPU or Triton custom calls), by
  the name their ``pallas_call`` was traced under (or the jitted function around an
  unnamed one, as megablox's), and how many calls each has."""
  kernels: dict[str, int] = {}
  for line in hlo.splitlines():
    if 'custom_call_target="tpu_custom_call"' in line or 'custom_call_target="__gpu$xla.gpu.triton"' in line:
      match = re.search(r'op_name="[^"]*?([\w.-]+)\)?/pallas_call"', line)
      name = match.group(1) if match else "pallas_call"
      kernels[name] = kernels.get(name, 0) + 1
  return kernels


def ptxas_kernels(log: str) -> dict[str, dict[str, int]]:
  """Per GPU kernel (ptxas entry function): registers, stack frame, spill stores and
  loads, and static shared memory, from ptxas's verbose output in XLA's log."""
  kernels = {}
  for match in re.finditer(
      r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
      r"(\d+) bytes spill loads\n[^\n]*Used (\d+) registers(?:[^\n]*?(\d+) bytes smem)?", log):
    name, stack, stores, loads, registers, smem = match.groups()
    kernels[name] = {"registers": int(registers), "stack_frame_bytes": int(stack),
                     "spill_store_bytes": int(stores), "spill_load_bytes": int(loads),
                     "static_shared_memory_bytes": int(smem or 0)}
  return kernels


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
  """Captures file descriptor 2 (where XLA's C++ logs go) into the yielded list's one
  entry; lines that are warnings or errors are written back to stderr."""
  captured: list[str] = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+") as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield captured
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      captured.append(sink.read())
  kept = [line for line in captured[0].splitlines() if re.match(r"[EWF]\d{4} ", line)]
  if kept:
    print("\n".join(kept), file=sys.stderr)


def _compile(jitted: Any, args: tuple, platform: str) -> tuple[Any, dict[str, Any]]:
  start = time.perf_counter()
  with captured_stderr() as log:
    compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  report = {
      "compile_seconds": round(seconds, 2),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,  # donated inputs reused as outputs
      "temp_bytes": memory.temp_size_in_bytes,
      "total_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
      "collectives": collectives(hlo),
      "pallas_kernels": pallas_kernels(hlo),
  }
  if platform == "gpu":  # ptxas's numbers for the Pallas kernels and for any kernel that spills
    kernels = ptxas_kernels(log[0])
    spilling = sorted(k for k, v in kernels.items() if v["spill_store_bytes"] or v["spill_load_bytes"])
    report["gpu_kernels"] = {k: v for k, v in kernels.items() if k in report["pallas_kernels"] or k in spilling}
    report["spilling_kernels"] = spilling
  return compiled, report


def _resource_exhausted(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def compile_run(setup: RunSetup, target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
  """Compiles the run's train, eval and decode steps for ``target``'s devices with the
  shardings a run uses; returns the compiled executables and the report. Raises
  DoesNotFitError when a step needs more memory per device than the target has."""
  state, batch = setup.abstract_state(), setup.abstract_batch()
  data = setup.config.data
  cache, token = setup.abstract_decode_inputs(data.batch_size, data.seq_len)
  steps = {
      "train_step": (setup.train_step, (state, batch)),
      "eval_step": (setup.eval_step, (state, batch)),
      "decode_step": (setup.decode_step, (state.params, state.model_state, token, cache)),
  }
  report: dict[str, Any] = {
      "target": target.name, "platform": target.platform, "devices": len(target.devices),
      "device_kind": target.devices[0].device_kind, "memory_per_device_bytes": target.memory_per_device,
      "mesh": dict(setup.mesh.shape), "strategy": setup.config.sharding.strategy,
      "per_device_bytes": {"params": bytes_per_device(state.params),
                           "opt_state": bytes_per_device(state.opt_state),
                           "batch": bytes_per_device(batch)},
      "steps": {},
  }
  compiled = {}
  with use_mesh(setup.mesh, setup.rules):
    for name, (jitted, args) in steps.items():
      try:
        compiled[name], report["steps"][name] = _compile(jitted, args, target.platform)
      except Exception as e:
        if not _resource_exhausted(e):
          raise
        first_line = str(e).strip().splitlines()[0]
        raise DoesNotFitError(f"{name} does not fit on {target.name} ({target.devices[0].device_kind}, "
                              f"{target.memory_per_device / 2**30:.2f} GiB per device): the compiler "
                              f"says {first_line}\n{MEMORY_KNOBS}") from e
      total = report["steps"][name]["total_bytes"]
      if total > target.memory_per_device:
        raise DoesNotFitError(f"{name} does not fit on {target.name}: it needs {total / 2**30:.2f} GiB per "
                              f"device (arguments, outputs and temporaries) against "
                              f"{target.memory_per_device / 2**30:.2f} GiB.\n{MEMORY_KNOBS}")
  return compiled, report


def format_report(report: dict[str, Any]) -> str:
  """The report as the table jaxlab.compile prints."""
  def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

  per = report["per_device_bytes"]
  lines = [
      f"target {report['target']}: {report['devices']} x {report['device_kind']}, "
      f"{report['memory_per_device_bytes'] / 2**30:.2f} GiB each; mesh {report['mesh']}, "
      f"strategy {report['strategy']}",
      f"per device: params {gib(per['params'])}, optimizer state {gib(per['opt_state'])}, "
      f"batch {gib(per['batch'])}",
  ]
  for name, step in report["steps"].items():
    lines.append(
        f"{name:12s} total {gib(step['total_bytes'])} ({100 * step['total_bytes'] / report['memory_per_device_bytes']:5.1f}% "
        f"of the device) = arguments {gib(step['argument_bytes'])} + outputs {gib(step['output_bytes'])} "
        f"- donated {gib(step['alias_bytes'])} + temporaries {gib(step['temp_bytes'])}; "
        f"compiled in {step['compile_seconds']:.1f} s")
    used = {k: v for k, v in step["collectives"].items() if v}
    lines.append(f"{'':12s} collectives {used or 'none'}; Pallas kernels {step['pallas_kernels'] or 'none'}")
    if step.get("spilling_kernels"):
      spills = {k: step["gpu_kernels"][k]["spill_store_bytes"] for k in step["spilling_kernels"]}
      lines.append(f"{'':12s} register spills (store bytes) {spills}")
  return "\n".join(lines)
