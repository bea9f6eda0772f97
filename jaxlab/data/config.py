"""Checks of the ``data`` config section, run before a run creates anything."""

from __future__ import annotations

from typing import Any

from jaxlab import checks
from jaxlab.data import corpora

SOURCES = ("python_docs", "text", "tokens", "mqar", "addition", "passkey", "domains")
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
BUILTIN_DOMAINS = ("arithmetic", "python_docs", "python_stdlib")


def check_domains_config(data: Any) -> None:
  """``data.domains``, ``data.domain_weights``, ``data.domain_max_bytes`` and, if used,
  ``data.arithmetic``; FileNotFoundError for a domain glob that matches no file."""
  if not data.domains:
    raise ValueError("data.domains is empty; name at least one domain, e.g. "
                     f"data.domains=dict(python_docs='builtin'); built-ins: {BUILTIN_DOMAINS}.")
  for name, spec in data.domains.items():
    if spec == "builtin":
      if name not in BUILTIN_DOMAINS:
        raise ValueError(f"data.domains.{name}='builtin' names no built-in domain; the built-ins are "
                         f"{BUILTIN_DOMAINS}; map {name!r} to globs of text files instead.")
    else:
      corpora.expand_paths(spec, field=f"data.domains.{name}")
  weights = dict(data.domain_weights)
  if weights and set(weights) != set(data.domains):
    raise ValueError(f"data.domain_weights={weights!r} must give a weight for every domain of data.domains "
                     f"{tuple(sorted(data.domains))} and no other, or be empty for equal weights.")
  for name, weight in weights.items():
    checks.number_in(f"data.domain_weights.{name}", weight, 0, float("inf"), closed="[)")
  if weights and not any(weights.values()):
    raise ValueError(f"data.domain_weights={weights!r} are all 0; give at least one domain a positive weight.")
  checks.positive_int("data.domain_max_bytes", data.domain_max_bytes)
  if data.domains.get("arithmetic") == "builtin":
    for name in ("min_digits", "max_digits", "num_problems"):
      checks.positive_int(f"data.arithmetic.{name}", data.arithmetic[name])
    if data.arithmetic.min_digits > data.arithmetic.max_digits:
      raise ValueError(f"data.arithmetic.min_digits={data.arithmetic.min_digits} exceeds "
                       f"data.arithmetic.max_digits={data.arithmetic.max_digits}; use min_digits <= max_digits.")


def check_data_config(data: Any) -> None:
  """Raises ValueError naming the first bad field of ``data``, its value and the fix
  (FileNotFoundError for globs that match no file)."""
  checks.choice("data.source", data.source, SOURCES)
  checks.positive_int("data.seq_len", data.seq_len)
  checks.positive_int("data.batch_size", data.batch_size)
  checks.number_in("data.val_fraction", data.val_fraction, 0, 1, closed="()")
  if data.source in ("text", "tokens") and not data.paths:
    raise ValueError(f"data.source={data.source!r} reads data.paths, which is empty; give files or "
                     "globs, e.g. --config.data.paths='data/*.txt'.")
  if data.source == "domains":
    check_domains_config(data)
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
