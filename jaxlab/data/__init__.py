"""Data: corpora, tokenizers, synthetic tasks, and grain pipelines behind one interface."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlab.data import corpora
from jaxlab.data.pipeline import PackedWindows, eval_batches, split_stream, train_dataset
from jaxlab.data.synthetic import MQAR
from jaxlab.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

SOURCES = ("python_docs", "text", "tokens", "mqar")


@dataclasses.dataclass
class DataSources:
  """Random-access train and validation records; ``tokenizer`` is None for synthetic
  tasks, whose tokens are not text."""

  train: Any
  validation: Any
  vocab_size: int
  tokenizer: Tokenizer | None


def make_sources(data: Any, seed: int) -> DataSources:
  """Builds the sources named by ``data.source`` (see experiments/configs for fields)."""
  if data.source == "mqar":
    mqar = dict(data.mqar)
    common = dict(
        vocab_size=mqar["vocab_size"], seq_len=data.seq_len, num_kv_pairs=mqar["num_kv_pairs"],
        power_a=mqar.get("power_a", 0.01), random_non_queries=mqar.get("random_non_queries", True),
    )
    return DataSources(
        train=MQAR(num_examples=mqar["num_train"], seed=seed, **common),
        validation=MQAR(num_examples=mqar["num_eval"], seed=seed + 1_000_003, **common),
        vocab_size=mqar["vocab_size"],
        tokenizer=None,
    )
  if data.source not in SOURCES:
    raise ValueError(f"data.source={data.source!r} is not known; use one of {SOURCES}.")
  tokenizer = make_tokenizer(data.get("tokenizer", "bytes"))
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
    "ByteTokenizer", "DataSources", "MQAR", "PackedWindows", "SOURCES", "Tokenizer",
    "eval_batches", "make_sources", "make_tokenizer", "split_stream", "train_dataset",
]
