"""Checks of the ``data`` config section, run before a run creates anything."""

from __future__ import annotations

from typing import Any

from jaxlab import checks

SOURCES = ("python_docs", "text", "tokens", "mqar", "addition", "passkey")
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")


def check_data_config(data: Any) -> None:
  """Raises ValueError naming the first bad field of ``data``, its value and the fix."""
  checks.choice("data.source", data.source, SOURCES)
  checks.positive_int("data.seq_len", data.seq_len)
  checks.positive_int("data.batch_size", data.batch_size)
  checks.number_in("data.val_fraction", data.val_fraction, 0, 1, closed="()")
  if data.source in ("text", "tokens") and not data.paths:
    raise ValueError(f"data.source={data.source!r} reads data.paths, which is empty; give files or "
                     "globs, e.g. --config.data.paths='data/*.txt'.")
  if data.source == "tokens":
    checks.choice("data.token_dtype", data.token_dtype, TOKEN_DTYPES)
  if data.source in ("mqar", "addition", "passkey"):
    task = data[data.source]
    for name in ("num_train", "num_eval"):
      checks.positive_int(f"data.{data.source}.{name}", task[name])
  if data.source == "mqar":
    checks.positive_int("data.mqar.vocab_size", data.mqar.vocab_size)
    checks.positive_int("data.mqar.num_kv_pairs", data.mqar.num_kv_pairs)
    checks.number_in("data.mqar.power_a", data.mqar.power_a, 0, float("inf"), closed="()")
  elif data.source == "addition":
    checks.positive_int("data.addition.min_digits", data.addition.min_digits)
    checks.positive_int("data.addition.max_digits", data.addition.max_digits)
  elif data.source == "passkey":
    for name in ("min_len", "max_len", "digits"):
      checks.positive_int(f"data.passkey.{name}", data.passkey[name])
