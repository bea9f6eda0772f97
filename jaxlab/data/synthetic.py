"""Synthetic tasks as random-access sources of LM records."""

from __future__ import annotations

import numpy as np

from jaxlab.data.pipeline import Record


class MQAR:
  """Multi-query associative recall, as Zoology's ``multiquery_ar`` (Arora et al. 2023).

  Each example lists ``num_kv_pairs`` pairs ``k v``: keys unique, drawn from
  ``[1, vocab/2)``, values from ``[vocab/2, vocab)``. Every key is then queried once
  in the rest of the sequence, at gap ``g`` (in pairs of slots) drawn without
  replacement with ``p(g) ∝ a · g^(a-1)``, ``g = 1..space`` (a power law favouring
  short gaps). The target at a query's position is its value; only those positions
  carry weight. With ``random_non_queries`` the remaining slots hold random tokens,
  else 0. Example ``i`` is a pure function of ``(seed, i)``.
  """

  def __init__(
      self, *, vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
      power_a: float = 0.01, random_non_queries: bool = True,
  ):
    context = 2 * num_kv_pairs
    if seq_len % 2:
      raise ValueError(f"MQAR needs an even data.seq_len; got {seq_len}.")
    if vocab_size <= seq_len:
      raise ValueError(f"MQAR needs data.mqar.vocab_size > data.seq_len; got {vocab_size} <= {seq_len}.")
    if 2 * context > seq_len:
      raise ValueError(
          f"MQAR with {num_kv_pairs} pairs needs data.seq_len >= {2 * context}; got {seq_len}."
      )
    if num_kv_pairs > vocab_size // 2 - 1:
      raise ValueError(f"MQAR: {num_kv_pairs} unique keys do not fit in vocab_size {vocab_size}.")
    self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
    self.num_examples, self.seed = num_examples, seed
    self.random_non_queries = random_non_queries
    space = (seq_len - context) // 2
    gap_probs = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    self._gap_probs = gap_probs / gap_probs.sum()

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Record:
    rng = np.random.default_rng([self.seed, int(index)])
    half, k, context = self.vocab_size // 2, self.num_kv_pairs, 2 * self.num_kv_pairs
    keys = rng.choice(np.arange(1, half), size=k, replace=False)
    values = rng.choice(np.arange(half, self.vocab_size), size=k, replace=False)
    gaps = rng.choice(len(self._gap_probs), size=k, replace=False, p=self._gap_probs)
    sequence = np.zeros(self.seq_len + 1, np.int64)
    sequence[0:context:2], sequence[1:context:2] = keys, values
    query_positions = context + 2 * gaps
    sequence[query_positions] = keys
    labels = np.full(self.seq_len + 1, -1, np.int64)
    labels[query_positions + 1] = values
    inputs, targets = sequence[:-1], labels[1:]
    if self.random_non_queries:
      filler = rng.integers(0, self.vocab_size, size=self.seq_len)
      inputs = np.where(inputs == 0, filler, inputs)
    weights = (targets >= 0).astype(np.float32)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": np.maximum(targets, 0).astype(np.int32),
        "weights": weights,
    }
