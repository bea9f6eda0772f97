"""Tokenizers: UTF-8 bytes by default, or any Hugging Face ``tokenizer.json``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """Token i < 256 is byte i; 256 is the end-of-document separator."""

  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A ``tokenizer.json`` read with the `tokenizers` library (the ``hf`` extra)."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(f"data.tokenizer={path!r} needs `pip install -e .[hf]`") from e
    self._tokenizer = _Tokenizer.from_file(path)
    self.vocab_size = self._tokenizer.get_vocab_size()
    eos = next(
        (self._tokenizer.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
         if self._tokenizer.token_to_id(t) is not None),
        None,
    )
    if eos is None:
      raise ValueError(f"tokenizer {path!r} has no end-of-text token (</s>, <|endoftext|>, <eos>).")
    self.eos_id = eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def make_tokenizer(name: str) -> Tokenizer:
  """``"bytes"`` or the path of a Hugging Face ``tokenizer.json``."""
  return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
