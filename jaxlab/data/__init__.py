"""Data: corpora, tokenizers, synthetic tasks, and grain pipelines behind one interface."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlab.data import corpora
from jaxlab.data.config import SOURCES, check_data_config
from jaxlab.data.domains import DomainMixture, DomainSplit, domain_sources
from jaxlab.data.pipeline import PackedWindows, eval_batches, split_stream, train_dataset
from jaxlab.data.synthetic import MQAR, Addition, Passkey
from jaxlab.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer


@dataclasses.dataclass
class DataSources:
  """Random-access train and validation records; ``tokenizer`` is None for synthetic
  tasks, whose tokens are not text. ``domains``: for the ``domains`` source, each
  domain's train and validation windows by name (in id order); else empty."""

  train: Any
  validation: Any
  vocab_size: int
  tokenizer: Tokenizer | None
  domains: dict[str, DomainSplit] = dataclasses.field(default_factory=dict)


def _synthetic(data: Any, seed: int) -> DataSources:
  """MQAR, addition or passkey: train and validation drawn with different seeds."""
  fields = dict(data[data.source])
  num_train, num_eval = fields.pop("num_train"), fields.pop("num_eval")
  if data.source == "mqar":
    fields.update(seq_len=data.seq_len)
    cls, vocab = MQAR, fields["vocab_size"]
  elif data.source == "addition":
    fields.update(seq_len=data.seq_len)
    cls, vocab = Addition, Addition.VOCAB_SIZE
  else:
    if fields["max_len"] != data.seq_len:
      raise ValueError(f"data.passkey.max_len={fields['max_len']} must equal data.seq_len={data.seq_len}.")
    cls, vocab = Passkey, Passkey.VOCAB_SIZE
  return DataSources(
      train=cls(num_examples=num_train, seed=seed, **fields),
      validation=cls(num_examples=num_eval, seed=seed + 1_000_003, **fields),
      vocab_size=vocab,
      tokenizer=None,
  )


def make_sources(data: Any, seed: int) -> DataSources:
  """Builds the sources named by ``data.source`` (see experiments/configs for fields)."""
  if data.source in ("mqar", "addition", "passkey"):
    return _synthetic(data, seed)
  if data.source not in SOURCES:
    raise ValueError(f"data.source={data.source!r} is not known; use one of {SOURCES}.")
  tokenizer = make_tokenizer(data.get("tokenizer", "bytes"))
  if data.source == "domains":
    train, validation, domains = domain_sources(data, tokenizer, seed)
    return DataSources(train, validation, tokenizer.vocab_size, tokenizer, domains)
  if data.source == "tokens":
    tokens = corpora.read_token_files(data.paths, data.get("token_dtype", "uint16"))
    vocab_size = int(tokens.max()) + 1
  else:
    documents = corpora.python_docs() if data.source == "python_docs" else corpora.read_text_files(data.paths)
    tokens = corpora.tokenize_documents(documents, tokenizer)
    vocab_size = tokenizer.vocab_size
  train, validation = split_stream(tokens, data.val_fraction)
  return DataSources(
      train=PackedWindows(train, data.seq_len),
      validation=PackedWindows(validation, data.seq_len),
      vocab_size=vocab_size,
      tokenizer=tokenizer,
  )


__all__ = [
    "Addition", "ByteTokenizer", "DataSources", "DomainMixture", "DomainSplit", "MQAR", "PackedWindows", "Passkey",
    "SOURCES", "Tokenizer", "check_data_config", "eval_batches", "make_sources", "make_tokenizer", "split_stream",
    "train_dataset",
]
