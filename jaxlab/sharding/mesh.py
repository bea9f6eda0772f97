"""Device mesh from the config: axes ("data", "fsdp", "tensor", "expert")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxlab.sharding.rules import MESH_AXES


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order; one size may be -1 and takes what is left."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, shape):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size} is not a valid size; use a positive size or -1.")
  fill = [i for i, size in enumerate(shape) if size == -1]
  if len(fill) > 1:
    raise ValueError(
        f"mesh axes {[MESH_AXES[i] for i in fill]} are all -1; at most one axis may be -1."
    )
  known = math.prod(size for size in shape if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes use {known} devices, which "
          f"does not divide the {num_devices} devices; change the fixed sizes."
      )
    shape[fill[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but "
        f"{num_devices} are available; make the sizes multiply to {num_devices} or set "
        "one axis (e.g. mesh.data) to -1."
    )
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh with Auto axis types (GSPMD propagation) over ``devices``. Devices
  of several TPU slices get a hybrid mesh whose ``data`` axis spans the slices (over
  the data-center network, as MaxText's DCN data parallelism) and whose other axes stay
  inside a slice."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(sizes, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  data = MESH_AXES.index("data")
  if shape[data] % slices:
    raise ValueError(
        f"mesh.data={shape[data]} must be a multiple of the {slices} slices: the data axis spans "
        "the slices and every other axis stays inside one; set mesh.data to a multiple of "
        f"{slices} (or -1)."
    )
  within = [n // slices if i == data else n for i, n in enumerate(shape)]
  across = [slices if i == data else 1 for i in range(len(shape))]
  return Mesh(mesh_utils.create_hybrid_device_mesh(within, across, devices), MESH_AXES, axis_types=axis_types)
