"""The Pallas kernels compile, not only lower, for real hardware from this CPU: every
kernel's public op with the per-platform dispatch, forward and gradient, at the shapes
the models use (`jaxlab.aot.kernel_cases`), for single TPU chips (libtpu) and GPUs
(XLA:GPU with Triton and ptxas), on GPUs with register spills as errors."""

import functools

import pytest

from jaxlab.aot.kernel_cases import CASES, PROGRAMS, compile_case
from jaxlab.aot.report import pallas_kernels
from jaxlab.aot.targets import get_target

TARGETS = ("v5e:1x1", "v6e:1x1", "h100", "a100")
GPUS = ("h100", "a100")
NO_SPILLS = {"xla_gpu_fail_ptx_compilation_on_register_spilling": True}


@functools.cache
def target(name: str):
  return get_target(name)


@pytest.mark.parametrize("target_name, case, program", [
    (t, c, p) for t in TARGETS for c in sorted(CASES) for p in PROGRAMS])
def test_kernels_compile_for_the_target(target_name, case, program):
  options = NO_SPILLS if target_name in GPUS else None
  compiled, _ = compile_case(CASES[case], program, target(target_name), options)
  found = pallas_kernels(compiled.as_text())
  assert CASES[case].kernels(program) <= set(found), f"Pallas kernels in the compiled {program}: {found}"
