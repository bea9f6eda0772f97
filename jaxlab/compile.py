"""Compile a run for a TPU slice or a GPU from any machine and report whether it fits:
``python -m jaxlab.compile --config=FILE --target=v5e-8 [--workdir=DIR] [--config.x=y ...]``.

Builds the run's mesh and shardings on the target's abstract devices and compiles the
train step (with its donation), the eval step and the one-token decode step with the
real compiler (libtpu's, or XLA:GPU with Triton and ptxas). Prints per-device memory
against the device's HBM, compile times, collectives, Pallas kernels and, on GPU,
register spills; with ``--workdir`` also writes ``compile_report.json`` and the
serialized train step, which ``--config.train.compiled_train_step=DIR/train_step.xla``
loads on the real hardware (same jax, libtpu or plugin version, and config).

Exit status: 0 when every step fits; 1 with the compiler's numbers and the settings that
lower memory when one does not, or when the target is unknown (the known ones listed).
"""

from __future__ import annotations

from jaxlab.aot import set_compile_environment

set_compile_environment(ptxas_log=True)

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from jaxlab.cli import define_config_flag  # noqa: E402

_CONFIG = define_config_flag()
_TARGET = flags.DEFINE_string("target", None, "v5e-8, v5litepod-16, v4-8, v5p-8, v6e-256, v5e:2x2, h100, h100x8, a100x4, h200")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the data-center network.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write compile_report.json and train_step.xla.")
flags.mark_flags_as_required(["target"])


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from jaxlab.aot.report import DoesNotFitError, compile_run, format_report
  from jaxlab.aot.targets import UnknownTargetError, get_target
  from jaxlab.aot.serialize import save_executable
  from jaxlab.train.build import build_run

  try:
    target = get_target(_TARGET.value, _NUM_SLICES.value)
  except UnknownTargetError as e:
    sys.exit(str(e))
  setup = build_run(_CONFIG.value, target.devices)
  workdir = Path(_WORKDIR.value) if _WORKDIR.value else None
  try:
    compiled, report = compile_run(setup, target)
  except DoesNotFitError as e:
    sys.exit(f"does not fit: {e}")
  print(format_report(report))
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    report["train_step_executable"] = save_executable(compiled["train_step"], workdir / "train_step.xla")
    (workdir / "compile_report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {workdir / 'compile_report.json'}")


if __name__ == "__main__":
  app.run(main)
