"""Compile targets by the names people rent them under, as abstract jax devices.

TPU slices (``v4-8``, ``v5e-16`` / ``v5litepod-16``, ``v5p-8``, ``v6e-256``; the number
counts TensorCores for v4 and v5p, chips for v5e and v6e, as Google Cloud names them)
and raw topologies (``v5e:2x2``) become libtpu's compile-only devices through
`jax.experimental.topologies`; GPUs (``h100``, ``h100x8``, ``a100x4``, ``h200``) become
XLA:GPU compile-only devices from the target specs shipped in ``gpu_targets/``. Needs
``jax[tpu]`` for TPU targets and ``jax[cuda13-local]`` with ``nvidia-cuda-nvcc`` for GPU
targets (the ``[compile]`` and ``[test]`` extras install both), and ``JAX_PLATFORMS=cpu``
(`jaxlab.aot.set_compile_environment`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
from jax.experimental import topologies

GPU_SPECS = Path(__file__).with_name("gpu_targets")
GPUS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
GIB = 2**30

# generation: (libtpu name, HBM per device in bytes, megacore: two TensorCores per device)
TPU_GENERATIONS = {
    "v4": ("v4", 32 * GIB, True),
    "v5e": ("v5e", 16 * GIB, False),
    "v5p": ("v5", 95 * GIB, True),
    "v6e": ("v6e", 32 * GIB, False),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
# chips: the slice's 2-d (v5e, v6e) or 3-d (v4, v5p) chip grid, as Cloud TPU lays it out
GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
           256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class UnknownTargetError(ValueError):
  """The target name is not one jaxlab knows; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # "tpu" or "gpu"
  devices: tuple[jax.Device, ...]
  memory_per_device: int  # bytes of HBM per device


def known_targets() -> str:
  tpu = ", ".join(f"{g}-N" for g in TPU_GENERATIONS)
  return (f"TPU slices {tpu} (N chips for v5e/v6e: {sorted(GRID_2D)}; N TensorCores for v4/v5p: "
          f"{sorted(2 * c for c in GRID_3D)}), v5litepod-N as v5e-N, raw topologies such as "
          f"v5e:2x2 or v4:2x2x1; GPUs {', '.join(sorted(GPUS))}, optionally xN for N on one host "
          "(h100x8)")


def _tpu_devices(topology: str, megacore: bool, chips: int, num_slices: int) -> tuple[jax.Device, ...]:
  grid = [int(n) for n in topology.split(":")[1].split("x")]
  if chips == 1:
    host = (1, 1, 1)
  elif chips == 8 and len(grid) == 2:
    host = (2, 4, 1)  # an 8-chip v5e / v6e VM is one host
  else:
    host = (2, 2, 1)  # 4 chips per host
  if len(grid) == 2:  # v5e / v6e: the 16-chip sides of 128- and 256-chip slices are tori
    wrap = (grid[0] >= 16, grid[1] >= 16, False)
  else:  # v4 / v5p: full cubes of 64 chips and more
    wrap = (chips >= 64,) * 3
  try:
    return tuple(topologies.get_topology_desc(
        topology, platform="tpu", chip_config_name="megacore" if megacore else "default",
        chips_per_host_bounds=host, wrap=wrap, num_slices=num_slices).devices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError(f"TPU targets need libtpu: pip install -e '.[compile]' (or 'jax[tpu]'); {e}") from e
    raise


def _tpu(name: str, num_slices: int) -> Target:
  raw = re.fullmatch(r"(v4|v5e|v5p|v5|v6e):(\d+(?:x\d+){1,2})", name)
  if raw:
    generation = TPU_ALIASES.get(raw.group(1), raw.group(1))
    libtpu_name, memory, megacore = TPU_GENERATIONS[generation]
    chips = 1
    for n in raw.group(2).split("x"):
      chips *= int(n)
    topology = f"{libtpu_name}:{raw.group(2)}"
  else:
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not match:
      raise UnknownTargetError(f"--target={name!r} is not known; known: {known_targets()}.")
    generation = TPU_ALIASES.get(match.group(1), match.group(1))
    if generation not in TPU_GENERATIONS:
      raise UnknownTargetError(f"--target={name!r} is not known; known: {known_targets()}.")
    libtpu_name, memory, megacore = TPU_GENERATIONS[generation]
    size = int(match.group(2))
    chips = size // 2 if megacore else size
    grids = GRID_3D if megacore else GRID_2D
    if chips not in grids or (megacore and size % 2):
      raise UnknownTargetError(f"--target={name!r}: {generation} comes in sizes "
                               f"{sorted(2 * c if megacore else c for c in grids)}; known: {known_targets()}.")
    topology = f"{libtpu_name}:{'x'.join(map(str, grids[chips]))}"
  devices = _tpu_devices(topology, megacore, chips, num_slices)
  label = name if num_slices == 1 else f"{num_slices} x {name}"
  return Target(name=label, platform="tpu", devices=devices, memory_per_device=memory)


def gpu_target_config(gpu: str) -> str:
  """The XLA GpuTargetConfigProto text of a GPU model (``h100``, ``h200``, ``a100``)."""
  return (GPU_SPECS / GPUS[gpu]).read_text()


def _gpu(name: str, gpu: str, count: int, num_slices: int) -> Target:
  if num_slices != 1:
    raise ValueError(f"--num_slices={num_slices}: multi-slice is for TPU targets; a GPU target "
                     "names its devices on one host (h100x8).")
  config = gpu_target_config(gpu)
  if jax.config.jax_platforms != "cpu":
    raise RuntimeError(f"GPU compile targets need JAX_PLATFORMS=cpu before jax starts (it is "
                       f"{jax.config.jax_platforms!r}); jaxlab.compile and the tests set it.")
  try:
    devices = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{count}").devices
  except NotImplementedError as e:
    raise RuntimeError(f"GPU targets need the CUDA plugin: pip install -e '.[compile]' (or "
                       f"'jax[cuda13-local]' and nvidia-cuda-nvcc); {e}") from e
  memory = int(re.search(r"device_memory_size: (\d+)", config).group(1))
  return Target(name=name, platform="gpu", devices=tuple(devices), memory_per_device=memory)


def get_target(name: str, num_slices: int = 1) -> Target:
  """The abstract devices of a target named as in `known_targets`."""
  name = name.strip().lower()
  gpu = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", name)
  if gpu and gpu.group(1) in GPUS:
    return _gpu(name, gpu.group(1), int(gpu.group(2) or 1), num_slices)
  return _tpu(name, num_slices)
