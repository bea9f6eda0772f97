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
  else 0. Example ``i`` is a pure function of ``(seed, i)``. Unlike Zoology, the
  vocabulary may be smaller than the sequence (small vocabularies learn fast on a CPU).
  """

  def __init__(
      self, *, vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
      power_a: float = 0.01, random_non_queries: bool = True,
  ):
    context = 2 * num_kv_pairs
    if seq_len % 2:
      raise ValueError(f"MQAR needs an even data.seq_len; got {seq_len}.")
    if 2 * context > seq_len:
      raise ValueError(
          f"MQAR with {num_kv_pairs} pairs needs data.seq_len >= {2 * context}; got {seq_len}."
      )
    if num_kv_pairs > vocab_size // 2 - 1:
      raise ValueError(f"MQAR with data.mqar.num_kv_pairs={num_kv_pairs} needs data.mqar.vocab_size >= "
                       f"{2 * num_kv_pairs + 2} (unique keys from [1, vocab/2)); got {vocab_size}.")
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


class Addition:
  """Integer addition with reversed digits (least significant first), the setting of
  the Abacus and TAPE arithmetic studies: ``a+b=c<eos>`` with a, b, c written in
  reverse. Operand lengths are drawn uniformly from ``[min_digits, max_digits]``
  (each operand its own); only the answer and the EOS carry weight. Tokens: digits
  0-9, then ``+``, ``=``, EOS and padding."""

  PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13
  VOCAB_SIZE = 14

  def __init__(self, *, min_digits: int, max_digits: int, num_examples: int, seed: int,
               seq_len: int | None = None):
    if not 1 <= min_digits <= max_digits:
      raise ValueError(f"addition digits must satisfy 1 <= min <= max; got {min_digits}, {max_digits}")
    longest = 3 * max_digits + 4  # a + b = c EOS, with c one digit longer
    self.seq_len = longest if seq_len is None else seq_len
    if self.seq_len < longest - 1:
      raise ValueError(f"data.seq_len={seq_len} is too short for {max_digits}-digit addition; "
                       f"use at least {longest - 1}.")
    self.min_digits, self.max_digits = min_digits, max_digits
    self.num_examples, self.seed = num_examples, seed

  def __len__(self) -> int:
    return self.num_examples

  @staticmethod
  def _number(rng: np.random.Generator, digits: int) -> int:
    """A uniform ``digits``-digit number; past 18 digits (numpy's int64) digit by digit."""
    if digits > 18:
      return int("".join(map(str, [rng.integers(1, 10), *rng.integers(0, 10, digits - 1)])))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))

  @staticmethod
  def reversed_digits(n: int) -> list[int]:
    """The digits of ``n``, least significant first."""
    return [int(c) for c in reversed(str(n))]

  def operands(self, index: int) -> tuple[int, int]:
    """Problem ``index``'s ``(a, b)``, a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([self.seed, int(index)])
    a = self._number(rng, int(rng.integers(self.min_digits, self.max_digits + 1)))
    b = self._number(rng, int(rng.integers(self.min_digits, self.max_digits + 1)))
    return a, b

  def __getitem__(self, index: int) -> Record:
    a, b = self.operands(index)
    prompt = self.reversed_digits(a) + [self.PLUS] + self.reversed_digits(b) + [self.EQUALS]
    answer = self.reversed_digits(a + b) + [self.EOS]
    sequence = np.full(self.seq_len + 1, self.PAD, np.int32)
    sequence[: len(prompt) + len(answer)] = prompt + answer
    weights = np.zeros(self.seq_len + 1, np.float32)
    weights[len(prompt) : len(prompt) + len(answer)] = 1.0
    return {"inputs": sequence[:-1], "targets": sequence[1:], "weights": weights[1:]}


class Passkey:
  """Passkey retrieval (Mohtashami & Jaggi 2023): a ``digits``-digit key marked by KEY
  sits at a random depth inside repeated filler text; after QUERY the model must
  reproduce the key. Context lengths are drawn from ``[min_len, max_len]``; only the
  key after QUERY carries weight. Tokens: digits 0-9, KEY, QUERY, EOS, then the filler."""

  KEY, QUERY, EOS, FILLER = 10, 11, 12, 13
  FILLER_PATTERN = np.arange(16)  # "The grass is green. The sky is blue. ..." as 16 tokens

  def __init__(self, *, min_len: int, max_len: int, num_examples: int, seed: int, digits: int = 5):
    self.min_len, self.max_len, self.digits = min_len, max_len, digits
    self.num_examples, self.seed = num_examples, seed
    self.seq_len = max_len
    if min_len < 2 * digits + 4:
      raise ValueError(f"passkey contexts need at least {2 * digits + 4} tokens; got min_len={min_len}")

  VOCAB_SIZE = FILLER + len(FILLER_PATTERN)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Record:
    rng = np.random.default_rng([self.seed, int(index)])
    length = int(rng.integers(self.min_len, self.max_len + 1))
    key = rng.integers(0, 10, size=self.digits)
    query = [self.QUERY, *key, self.EOS]
    filler_len = length + 1 - len(query) - (self.digits + 1)
    depth = int(rng.integers(0, filler_len + 1))
    filler = self.FILLER + self.FILLER_PATTERN[np.arange(filler_len) % len(self.FILLER_PATTERN)]
    body = np.concatenate([filler[:depth], [self.KEY], key, filler[depth:]])
    sequence = np.full(self.seq_len + 1, self.EOS, np.int32)
    sequence[: length + 1] = np.concatenate([body, query])
    weights = np.zeros(self.seq_len + 1, np.float32)
    weights[length + 1 - self.digits - 1 : length + 1] = 1.0  # the key digits and EOS after QUERY
    return {"inputs": sequence[:-1], "targets": sequence[1:], "weights": weights[1:]}
