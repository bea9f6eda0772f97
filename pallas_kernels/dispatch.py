"""The ``implementation`` argument every kernel's ops.py takes, and which interpreter
runs the Pallas kernels off their hardware (``implementation="pallas_interpret"``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax

INTERPRET_BACKENDS = (None, "tpu", "gpu")


def resolve_interpret_backend(requested: str | None) -> str:
  """``"tpu"``: the Mosaic kernels under jax's TPU interpreter; ``"gpu"``: the Pallas GPU
  kernels under the generic interpreter. None picks ``"tpu"``, except under an active
  mesh of several devices: the TPU interpreter holds every device at a barrier inside
  each kernel, which deadlocks on XLA:CPU's devices, so there None picks ``"gpu"`` and
  an explicit ``"tpu"`` is an error."""
  if requested not in INTERPRET_BACKENDS:
    raise ValueError(f"interpret_backend={requested!r}; use one of {INTERPRET_BACKENDS}")
  mesh = jax.sharding.get_abstract_mesh()
  several = not mesh.empty and math.prod(mesh.axis_sizes) > 1
  if requested is None:
    return "gpu" if several else "tpu"
  if requested == "tpu" and several:
    raise ValueError(
        "interpret_backend='tpu' under a mesh of several devices: jax's TPU interpreter waits "
        "for every device at a barrier inside each kernel, which deadlocks on CPU devices; use "
        "interpret_backend='gpu' (or None) under a mesh.")
  return requested


def choose(
    implementation: str | None,
    kernel: Callable[[str, bool], Callable],
    xla: Callable,
    interpret_backend: str,
    others: Mapping[str, Callable] | None = None,
) -> Callable:
  """The function ``implementation`` names. ``kernel(backend, interpret)`` builds the
  Pallas kernel for ``"tpu"`` or ``"gpu"``; ``xla`` is the plain-JAX fast path;
  ``others`` holds kernel-specific names (``"sequential"``, ...). ``"pallas"`` and None
  choose at lowering time with `jax.lax.platform_dependent`: the Mosaic kernel on TPU,
  the GPU kernel on CUDA, and (None only) the XLA path elsewhere."""
  if others and implementation in others:
    return others[implementation]
  if implementation == "xla":
    return xla
  if implementation == "pallas_interpret":
    return kernel(interpret_backend, True)
  on_tpu, on_gpu = kernel("tpu", False), kernel("gpu", False)
  if implementation == "pallas":
    return lambda *args: jax.lax.platform_dependent(*args, tpu=on_tpu, cuda=on_gpu)
  return lambda *args: jax.lax.platform_dependent(*args, tpu=on_tpu, cuda=on_gpu, default=xla)
