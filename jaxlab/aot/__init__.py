"""Ahead-of-time compilation for TPU slices and GPUs from any machine."""

import os
import sys


def set_compile_environment(*, ptxas_log: bool = False) -> None:
  """What compiling for abstract TPU and GPU devices on a CPU host needs, set before jax
  starts: the installed accelerator plugins' backends off (they look for hardware and
  the CUDA plugin registers no topology otherwise), no TPU metadata-server query,
  several processes allowed to load libtpu (pytest-xdist), and with ``ptxas_log`` XLA
  logging ptxas's verbose output (registers and spills per GPU kernel)."""
  if "jax" in sys.modules:
    raise RuntimeError("set_compile_environment() must run before jax is imported.")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if ptxas_log:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    modules = [os.environ.get("TF_CPP_VMODULE"), "subprocess_compilation=3"]
    os.environ["TF_CPP_VMODULE"] = ",".join(filter(None, modules))
