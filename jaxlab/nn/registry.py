"""Registries of sequence mixers and feed-forward layers, chosen per layer by name.

A mixer is built as ``cls(config, layer=i, rngs=rngs)`` and offers three calls:
``__call__(x, positions)`` over a full sequence, ``init_cache(batch, max_len, dtype)``
and ``decode(x, positions, cache) -> (y, cache)`` for the next ``x.shape[1]`` tokens at
``positions`` (one token when decoding, the whole prompt when prefilling). A mixer
that supports TAPE also takes and returns the position features ``pe`` in both calls.
A feed-forward layer is built the same way and called as ``ffn(x)``; the name ``"none"``
leaves a block without one. Registered mixers: ``attention`` (jaxlab/nn/attention.py),
``mamba``, ``mamba2``, ``s4d`` (jaxlab/nn/ssm.py), ``gla`` (jaxlab/nn/linear_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable

MIXERS: dict[str, type] = {}
FFNS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
  def decorator(cls: type) -> type:
    if name in table:
      raise ValueError(f"{kind} {name!r} is registered twice ({table[name]} and {cls})")
    table[name] = cls
    return cls

  return decorator


def register_mixer(name: str) -> Callable[[type], type]:
  return _register(MIXERS, "mixer", name)


def register_ffn(name: str) -> Callable[[type], type]:
  return _register(FFNS, "ffn", name)


def lookup(table: dict[str, type], kind: str, name: str) -> type:
  if name not in table:
    raise ValueError(f"model.{kind}s names {name!r}, which is not registered; known: {sorted(table)}")
  return table[name]
