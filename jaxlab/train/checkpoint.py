"""orbax checkpoints of the train state and the data iterator, verified before use.

Each save also writes a fingerprint of what it saved: two 32-bit hashes of every state
array, computed on device from the arrays' bits, and a hash of every host's data
iterator position. A restore recomputes them from what it read; a step whose files
cannot be read or whose contents differ from what was saved is refused by name,
moved to ``refused_checkpoints/`` beside the checkpoint directory (never deleted),
and the next older step is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlab.train.state import path_name

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The checkpoint holds a different model than the config describes."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step cannot be read, or what it holds differs from what was saved."""


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


_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _array_hashes(x: jax.Array) -> jax.Array:
  """Two position-dependent 32-bit hashes of the bits of ``x`` (murmur3's finalizer on
  each word xor its index, summed mod 2^32): any changed word changes them, whatever
  the sharding or the order of the reduction, since integer sums are exact."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  words = jax.lax.bitcast_convert_type(x, _WORD_DTYPES[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):  # the flat index, without reshaping a sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  hashes = []
  for seed in (0x9E3779B9, 0x7F4A7C15):
    h = words ^ (index * jnp.uint32(0x85EBCA77) + jnp.uint32(seed))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    hashes.append(jnp.sum(h ^ (h >> 16), dtype=jnp.uint32))
  return jnp.stack(hashes)


@jax.jit
def _tree_hashes(tree: Any) -> list[jax.Array]:
  return [_array_hashes(x) for x in jax.tree.leaves(tree)]


def state_fingerprint(tree: Any) -> dict[str, list[int]]:
  """``{path: [hash, hash]}`` for every array of ``tree``; equal on every host."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  hashes = [np.asarray(h.addressable_data(0)) for h in _tree_hashes(tree)]
  return {name: [int(v) for v in h] for name, h in zip(names, hashes)}


def _data_hash(data_iterator: Any) -> int:
  """A 31-bit hash of this host's iterator position (an int32, for gathering over hosts)."""
  text = json.dumps(data_iterator.get_state(), sort_keys=True, default=str)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1


def _every_host(value: int | bool) -> list:
  """``value`` of every host, in process order."""
  if jax.process_count() == 1:
    return [value]
  return multihost_utils.process_allgather(np.asarray(value)).tolist()


class Checkpointer:
  """Keeps the last ``keep`` checkpoints in ``directory``, saving asynchronously.

  Each checkpoint holds ``state`` (the TrainState, RNG included), ``data`` (every
  host's grain iterator position) and ``fingerprint`` (what a restore verifies).
  """

  def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.refused_directory = self.directory.parent / "refused_checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "fingerprint": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    fingerprint = {"state": state_fingerprint(state), "data": _every_host(_data_hash(data_iterator))}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        fingerprint=ocp.args.JsonSave(fingerprint),
    )
    self.manager.save(step, args=args, force=True)

  def check_compatible(self, step: int, target: Any) -> None:
    """Raises CheckpointMismatchError naming every parameter whose shape differs, and
    CorruptCheckpointError if the step's metadata cannot be read."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
      if metadata is None:
        raise ValueError("orbax found no state metadata")
      saved = _shapes(metadata)
    except Exception as e:
      raise CorruptCheckpointError(
          f"checkpoint {self.directory / str(step)} has no readable metadata ({e}); it is corrupt "
          "or incomplete."
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

  def restore(self, step: int, target: Any, data_iterator: Any | None) -> Any:
    """Restores state into ``target``'s shardings and the iterator in place, verifying
    both against the step's fingerprint; ``data_iterator=None`` restores the state only
    (another run's checkpoint, read to start this one)."""
    self.check_compatible(step, target)
    where = self.directory / str(step)
    items = dict(state=ocp.args.StandardRestore(target), fingerprint=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CorruptCheckpointError(
          f"checkpoint {where} could not be read: {e}\nIt is corrupt, incomplete, or written by "
          "another number of hosts."
      ) from e
    saved = restored["fingerprint"]
    found = state_fingerprint(restored["state"])
    differ = [name for name, hashes in found.items() if saved["state"].get(name) != hashes]
    if differ:
      listed = ", ".join(differ[:8]) + (", ..." if len(differ) > 8 else "")
      raise CorruptCheckpointError(
          f"checkpoint {where} is corrupt: {len(differ)} of {len(found)} arrays differ from what was "
          f"saved ({listed})."
      )
    if data_iterator is not None and saved["data"][jax.process_index()] != _data_hash(data_iterator):
      raise CorruptCheckpointError(f"checkpoint {where} is corrupt: the data iterator position of host "
                                   f"{jax.process_index()} differs from what was saved.")
    return restored["state"]

  def restore_newest_intact(self, target: Any, data_iterator: Any) -> tuple[int | None, Any]:
    """``(step, state)`` of the newest checkpoint that verifies, or ``(None, None)`` when
    there is none. Refused steps are moved to `refused_directory` with a warning; if
    every step is refused, raises CorruptCheckpointError (a rerun then starts fresh)."""
    refused = []
    for step in reversed(self.all_steps()):
      try:
        state, error = self.restore(step, target, data_iterator), None
      except CorruptCheckpointError as e:
        state, error = None, e
      if all(_every_host(error is None)):
        return step, state
      moved_to = self._refuse(step)
      log.warning("%s\nRefused: moved to %s; trying the next older checkpoint.",
                  error or f"another host refused checkpoint {step}", moved_to)
      refused.append(f"step {step}: {error}")
    if refused:
      raise CorruptCheckpointError(
          "no intact checkpoint is left in {}; every step was refused and moved to {}:\n  {}\nA "
          "rerun trains from scratch; to retry a refused step, move it back.".format(
              self.directory, self.refused_directory, "\n  ".join(refused))
      )
    return None, None

  def _refuse(self, step: int) -> Path:
    """Moves a step's directory aside (never deletes it) so orbax no longer lists it."""
    destination = self.refused_directory / str(step)
    copy = 1
    while destination.exists():
      copy += 1
      destination = self.refused_directory / f"{step}.{copy}"
    if jax.process_index() == 0:
      destination.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxlab_refuse_checkpoint_{step}")
    self.manager.reload()
    return destination

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
