"""Text and token sources: the bundled corpus, the user's text files, token files.

The bundled corpus is CPython's own documentation of the language reference,
``pydoc_data/topics.py`` (the text behind ``help("assert")`` and friends): real
English prose with code, 79 documents and 466 KB in Python 3.11, on every machine
that has Python, no download needed. Beside it, the standard library's own source
files give a code corpus the same way (`python_stdlib`).
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxlab.data.tokenizers import Tokenizer


def python_docs() -> list[str]:
  """The documents of CPython's ``pydoc_data.topics``, in a fixed (sorted) order."""
  from pydoc_data import topics

  return [topics.topics[key] for key in sorted(topics.topics)]


def python_stdlib() -> Iterator[str]:
  """The standard library's own top-level ``*.py`` files (``sysconfig``'s ``stdlib`` path),
  sorted by name, read lazily as UTF-8: real code, on every machine that has Python."""
  for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
    yield path.read_text(encoding="utf-8", errors="replace")


def expand_paths(patterns: str | Sequence[str], field: str = "data.paths") -> list[Path]:
  """The files the globs match, sorted; an error naming the config ``field`` if none."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  paths = sorted({Path(p) for pattern in patterns for p in glob.glob(str(pattern), recursive=True)})
  if not paths:
    raise FileNotFoundError(f"{field}={patterns!r} matches no file; give existing files or globs.")
  return paths


def read_text_files(patterns: str | Sequence[str], field: str = "data.paths") -> list[str]:
  """One document per file, read as UTF-8."""
  return [path.read_text(encoding="utf-8", errors="replace") for path in expand_paths(patterns, field)]


def read_token_files(patterns: str | Sequence[str], dtype: str = "uint16") -> np.ndarray:
  """Concatenates pre-tokenized files: ``.npy`` (any integer dtype) or raw ``.bin``
  (a flat array of ``dtype``, as nanoGPT writes them)."""
  arrays = []
  for path in expand_paths(patterns):
    if path.suffix == ".npy":
      array = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
      array = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    else:
      raise ValueError(f"token file {path} must end in .npy or .bin")
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"token file {path} holds {array.dtype}, not integer token ids")
    arrays.append(np.asarray(array).reshape(-1).astype(np.int32))
  return np.concatenate(arrays)


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
  """One token stream: each document's tokens followed by the end-of-document token."""
  pieces = []
  for doc in documents:
    pieces.append(tokenizer.encode(doc))
    pieces.append(np.asarray([tokenizer.eos_id], np.int32))
  return np.concatenate(pieces).astype(np.int32)


def cap_bytes(documents: Iterable[str], max_bytes: int) -> list[str]:
  """Whole documents, in order, until their UTF-8 size reaches ``max_bytes``; the one that
  crosses it is cut there, so the result holds min(total, ``max_bytes``) bytes."""
  kept, left = [], max_bytes
  for doc in documents:
    if left <= 0:
      break
    data = doc.encode("utf-8")
    kept.append(doc if len(data) <= left else data[:left].decode("utf-8", errors="ignore"))
    left -= len(data)
  return kept
