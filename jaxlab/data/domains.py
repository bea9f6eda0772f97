"""Named domains mixed into one source, each record carrying its domain's id.

``data.domains`` maps a name to ``"builtin"`` or to globs of the user's text files. The
built-ins: ``python_docs`` (CPython's documentation prose, `corpora.python_docs`),
``python_stdlib`` (the standard library's top-level ``*.py`` sources: code) and
``arithmetic`` (the reversed-digit addition problems of `synthetic.Addition` as text lines).
Text domains keep their first ``data.domain_max_bytes`` bytes (`corpora.cap_bytes`), so
domains are of comparable size; ``arithmetic`` holds ``data.arithmetic.num_problems`` lines.
All go through ``data.tokenizer``, so they share one token space. Each domain's stream is
split into train and validation (`split_stream`) and cut into `PackedWindows`. A domain's id
is its index in the sorted domain names (the order a ConfigDict keeps them in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from jaxtyping import Int

from jaxlab.data import corpora
from jaxlab.data.pipeline import PackedWindows, Record, split_stream
from jaxlab.data.synthetic import Addition
from jaxlab.data.tokenizers import Tokenizer


@dataclasses.dataclass
class DomainSplit:
  """One domain's train and validation windows."""

  train: PackedWindows
  validation: PackedWindows


def _interleaving(counts: Sequence[int]) -> np.ndarray:
  """Block positions ordered by ``(j + 1/2) / c_d`` for the ``j``-th of block ``d``'s ``c_d``, ties by ``d``."""
  keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
  return np.argsort(keys, kind="stable")


class DomainMixture:
  """Random access to several domains' windows; each record gains ``domain``, the int32
  index of the source it came from.

  The rule: with shares ``p_d = w_d / sum(w)`` and ``n_d`` windows in domain d, let
  ``M = max n_d / p_d`` over the domains with ``p_d > 0``. Domain d owns the
  ``c_d = ceil(M p_d)`` consecutive indices ``[o_d, o_d + c_d)`` (``o`` the running sum of
  ``c``), and index ``o_d + j`` reads its window ``j mod n_d``. So one pass over the
  mixture reads every window of every weighted domain at least once (the domain with the
  largest ``n_d / p_d`` exactly once; smaller ones cycle), domain d's share of it is
  ``p_d`` up to rounding (``0 <= c_d - M p_d < 1``), and a zero weight leaves a domain
  out. Weights proportional to the ``n_d`` give the plain concatenation (``c_d = n_d``).
  `train_dataset`'s shuffle then mixes the blocks. With ``interleave`` index ``i`` reads
  instead the ``i``-th of those records ordered by ``(j + 1/2) / c_d`` (ties by domain), so
  every prefix holds each domain in proportion: a bounded eval (``train.eval_batches``)
  still sees every domain.
  """

  def __init__(self, sources: Sequence[PackedWindows], weights: Sequence[float], interleave: bool = False):
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
      raise ValueError(f"mixture weights {tuple(weights)} must be one per domain, >= 0, not all 0.")
    total = sum(map(Fraction, weights))
    shares = [Fraction(w) / total for w in weights]
    most = max(Fraction(len(s)) / p for s, p in zip(sources, shares) if p > 0)
    self.sources = list(sources)
    self.counts = [math.ceil(most * p) for p in shares]
    self.offsets = np.cumsum([0, *self.counts])
    self.order = _interleaving(self.counts) if interleave else None

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> Record:
    index = int(index if self.order is None else self.order[index])
    domain = int(np.searchsorted(self.offsets, index, side="right")) - 1
    source = self.sources[domain]
    return {**source[(index - int(self.offsets[domain])) % len(source)], "domain": np.int32(domain)}

  @property
  def tokens(self) -> Int[np.ndarray, " tokens"]:
    """The weighted domains' token streams end to end (for unigram statistics and sample prompts)."""
    return np.concatenate([s.tokens for s, c in zip(self.sources, self.counts) if c])


def arithmetic_text(min_digits: int, max_digits: int, num_problems: int, seed: int) -> str:
  """The first ``num_problems`` problems of ``Addition(..., seed=seed)`` as lines ``a+b=c``,
  every number least-significant digit first (``321+54=861`` is 123 + 45 = 168)."""
  task = Addition(min_digits=min_digits, max_digits=max_digits, num_examples=num_problems, seed=seed)

  def number(n: int) -> str:
    return "".join(map(str, Addition.reversed_digits(n)))

  problems = map(task.operands, range(num_problems))
  return "".join(f"{number(a)}+{number(b)}={number(a + b)}\n" for a, b in problems)


def domain_documents(name: str, spec: Any, data: Any, seed: int) -> list[str]:
  """The documents of domain ``name``: a built-in corpus, or the files ``spec``'s globs match."""
  if spec != "builtin":
    return corpora.cap_bytes(corpora.read_text_files(spec, field=f"data.domains.{name}"), data.domain_max_bytes)
  if name == "python_docs":
    return corpora.cap_bytes(corpora.python_docs(), data.domain_max_bytes)
  if name == "python_stdlib":
    return corpora.cap_bytes(corpora.python_stdlib(), data.domain_max_bytes)
  if name == "arithmetic":
    task = data.arithmetic
    return [arithmetic_text(task.min_digits, task.max_digits, task.num_problems, seed)]
  raise ValueError(f"data.domains.{name}='builtin' names no built-in domain; give globs of text files.")


def _split(name: str, tokens: np.ndarray, data: Any) -> DomainSplit:
  train, validation = split_stream(tokens, data.val_fraction)
  try:
    return DomainSplit(PackedWindows(train, data.seq_len), PackedWindows(validation, data.seq_len))
  except ValueError as e:
    raise ValueError(f"domain {name!r}: {e}") from None


def domain_sources(
    data: Any, tokenizer: Tokenizer, seed: int
) -> tuple[DomainMixture, DomainMixture, dict[str, DomainSplit]]:
  """The training mixture (weighted by ``data.domain_weights``, empty: equal), the
  validation windows of all domains interleaved, and each domain's splits by name, in id order."""
  splits = {}
  for name in sorted(data.domains):
    documents = domain_documents(name, data.domains[name], data, seed)
    splits[name] = _split(name, corpora.tokenize_documents(documents, tokenizer), data)
  weights = [data.domain_weights[name] for name in splits] if data.domain_weights else [1.0] * len(splits)
  train = DomainMixture([s.train for s in splits.values()], weights)
  validation = DomainMixture([s.validation for s in splits.values()], [len(s.validation) for s in splits.values()],
                             interleave=True)
  return train, validation, splits
