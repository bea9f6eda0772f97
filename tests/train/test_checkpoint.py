"""Checkpoint fingerprints: what a restore verifies, and what it does with a step that fails."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.train.checkpoint import Checkpointer, CorruptCheckpointError, state_fingerprint


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_fingerprint_changes_with_any_bit_and_any_swap(dtype):
  rng = np.random.default_rng(7)
  x = np.asarray(jnp.asarray(rng.normal(size=(5, 37)) * 50 if dtype != jnp.bool_ else rng.random((5, 37)) > 0.5,
                             dtype))
  base = state_fingerprint({"x": jnp.asarray(x)})["x"]
  assert state_fingerprint({"x": jnp.asarray(x.copy())})["x"] == base
  for _ in range(8):
    flipped = x.copy()
    raw = flipped.view(np.uint8).reshape(-1)
    raw[rng.integers(raw.size)] ^= np.uint8(1 if dtype == jnp.bool_ else 1 << rng.integers(8))
    assert state_fingerprint({"x": jnp.asarray(flipped)})["x"] != base
  rows = x[[1, 0, 2, 3, 4]]
  assert (rows == x).all() or state_fingerprint({"x": jnp.asarray(rows)})["x"] != base


def _checkpoint_two_steps(tmp_path):
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  states = {}
  for step in (1, 2):
    next(iterator)
    states[step] = {"w": jnp.full((4, 8), float(step)), "count": jnp.asarray(step, jnp.int32)}
    checkpointer.save(step, states[step], iterator)
  checkpointer.wait()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[1])
  return checkpointer, target, states


def test_a_step_whose_arrays_differ_from_their_fingerprint_is_refused(tmp_path, caplog):
  """As if the bytes of array ``w`` had changed on disk: the restore refuses step 2 by
  name, moves it aside intact, and returns step 1."""
  checkpointer, target, states = _checkpoint_two_steps(tmp_path)
  fingerprint_file = tmp_path / "checkpoints" / "2" / "fingerprint" / "metadata"
  saved = json.loads(fingerprint_file.read_text())
  saved["state"]["w"][0] ^= 1
  fingerprint_file.write_text(json.dumps(saved))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with caplog.at_level("WARNING"):
    step, state = checkpointer.restore_newest_intact(target, iterator)
  assert step == 1 and float(state["w"][0, 0]) == 1.0 and next(iterator) == 1
  assert "checkpoints/2 is corrupt: 1 of 2 arrays differ from what was saved (w)" in caplog.text
  assert checkpointer.all_steps() == [1]
  assert (tmp_path / "refused_checkpoints" / "2" / "state").is_dir()
  checkpointer.close()


def test_a_changed_data_position_is_refused(tmp_path):
  checkpointer, target, _ = _checkpoint_two_steps(tmp_path)
  position = tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json"
  position.write_text(position.read_text().replace('"next_index": 2', '"next_index": 5'))
  with pytest.raises(CorruptCheckpointError, match="data iterator position of host 0 differs"):
    checkpointer.restore(2, target, iter(grain.MapDataset.range(100).to_iter_dataset()))
  checkpointer.close()
