"""orbax checkpoints of the train state and the data iterator, checked before restore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxlab.train.state import path_name


class CheckpointMismatchError(ValueError):
  """The checkpoint holds a different model than the config describes."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_target(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (which may be another mesh's)."""
  leaf_shardings = jax.tree.map(
      lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, abstract,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, leaf_shardings
  )


class Checkpointer:
  """Keeps the last ``keep`` checkpoints in ``directory``, saving asynchronously.

  Each checkpoint holds ``state`` (the TrainState, RNG included) and ``data`` (every
  host's grain iterator position).
  """

  def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    )
    self.manager.save(step, args=args, force=True)

  def check_compatible(self, step: int, target: Any) -> None:
    """Raises CheckpointMismatchError naming every parameter whose shape differs."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
      if metadata is None:
        raise ValueError("orbax found no state metadata")
      saved = _shapes(metadata)
    except Exception as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} has no readable metadata ({e}); it is corrupt "
          "or incomplete. Move that step's directory away to resume from an earlier checkpoint."
      ) from e
    expected = _shapes(target)
    problems = [
        f"{key}: checkpoint {saved[key]} vs config {shape}"
        for key, shape in expected.items() if key in saved and saved[key] != shape
    ]
    problems += [f"{key}: missing from the checkpoint" for key in expected if key not in saved]
    problems += [f"{key}: in the checkpoint but not in the model" for key in saved if key not in expected]
    if problems:
      listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} was written by a different model:\n  {listed}\n"
          "Use the config that wrote it, or a new --workdir to train this config from scratch."
      )

  def restore(self, step: int, target: Any, data_iterator: Any) -> Any:
    """Restores state into ``target``'s shardings and the iterator in place."""
    self.check_compatible(step, target)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
    )
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:
      raise RuntimeError(
          f"checkpoint {self.directory / str(step)} could not be read: {e}\nIt may be corrupt or "
          "written by another number of hosts. Move that step's directory away to resume from "
          "an earlier checkpoint."
      ) from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
