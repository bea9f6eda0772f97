"""Saving a compiled train step, and loading it on the hardware it was compiled for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable


def save_executable(compiled: jax.stages.Compiled, path: Path) -> str:
  """Writes ``compiled`` to ``path``; returns the path, or why this jax cannot serialize it."""
  try:
    data, _, _ = serialize_executable.serialize(compiled)
  except (ValueError, NotImplementedError) as e:
    return f"not saved: {e}"
  Path(path).write_bytes(data)
  return str(path)


def load_executable(path: str | Path, jitted: Any, args: tuple, devices: list[jax.Device]) -> jax.stages.Compiled:
  """The executable saved at ``path`` for ``jitted(*args)`` (``args`` as sharded
  ShapeDtypeStructs), loaded onto ``devices``. The trees are rebuilt from ``args``, as
  MaxText does: serialization keeps only the program."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"train.compiled_train_step={str(path)!r} is not a file; write one with "
                            "python -m jaxlab.compile --workdir=DIR, or unset the field.")
  in_tree = jax.tree.structure((args, {}))
  out_tree = jax.tree.structure(jax.eval_shape(jitted, *args))
  try:
    return serialize_executable.deserialize_and_load(path.read_bytes(), in_tree, out_tree,
                                                     execution_devices=devices)
  except Exception as e:
    raise RuntimeError(f"train.compiled_train_step={str(path)!r} does not load on these devices "
                       f"({devices[0].device_kind} x {len(devices)}): {e}\nIt must be compiled by the same "
                       "jax, plugin and config for this target; recompile it or unset the field.") from e
