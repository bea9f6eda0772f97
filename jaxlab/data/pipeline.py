"""grain pipelines: packed LM windows, deterministic shuffling, per-host shards.

Every source is a random-access sequence of records ``{"inputs", "targets",
"weights"}``, each ``[seq_len]``. Training shuffles the whole source (differently in
every epoch), then host p of n reads records p, p + n, p + 2n, ... of that order, so
global batch j holds the same records whatever the number of hosts, and no host
reads another host's records.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np

Record = dict[str, np.ndarray]


class PackedWindows:
  """A token stream cut into consecutive windows of ``seq_len + 1`` tokens (one shared
  at each boundary): documents are packed end to end, separated by EOS tokens."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if len(tokens) < seq_len + 1:
      raise ValueError(
          f"the token stream has {len(tokens)} tokens, fewer than data.seq_len + 1 = "
          f"{seq_len + 1}; use a shorter data.seq_len or more data."
      )
    self.tokens = tokens
    self.seq_len = seq_len

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, index: int) -> Record:
    start = index * self.seq_len
    window = np.asarray(self.tokens[start : start + self.seq_len + 1], np.int32)
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "weights": np.ones(self.seq_len, np.float32),
    }


def split_stream(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Train on the first ``1 - val_fraction`` of the stream, validate on the rest."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1).")
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


def _host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(
        f"data.batch_size={global_batch} is not divisible by the {process_count} hosts; "
        f"use a multiple of {process_count}."
    )
  return global_batch // process_count


def _host(process: tuple[int, int] | None) -> tuple[int, int]:
  return (jax.process_index(), jax.process_count()) if process is None else process


def train_dataset(
    source, global_batch: int, seed: int, process: tuple[int, int] | None = None
) -> grain.IterDataset:
  """Infinite, reshuffled every epoch: host p of n (``process=(p, n)``, default this
  process) gets its share of each global batch."""
  p, n = _host(process)
  if len(source) < global_batch:
    raise ValueError(
        f"the training source has {len(source)} records, fewer than data.batch_size="
        f"{global_batch}; use a smaller batch or more data."
    )
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds[p::n].batch(_host_batch_size(global_batch, n), drop_remainder=True)
  return ds.to_iter_dataset()


def eval_batches(
    source, global_batch: int, max_batches: int | None, process: tuple[int, int] | None = None,
    name: str = "the validation source",
) -> Iterator[Record]:
  """This host's share of the first ``max_batches`` global batches, in order (None: all);
  ``name`` names the source in the error for one with fewer records than a batch."""
  p, n = _host(process)
  num = len(source) // global_batch
  if num == 0:
    raise ValueError(
        f"{name} has {len(source)} records, fewer than data.batch_size="
        f"{global_batch}; lower data.batch_size or raise data.val_fraction."
    )
  if max_batches is not None:
    num = min(num, max_batches)
  ds = grain.MapDataset.source(source)[: num * global_batch][p::n]
  return iter(ds.batch(_host_batch_size(global_batch, n), drop_remainder=True))
