"""Config checks that name the field, the value and the fix, shared by every config section."""

from __future__ import annotations

import math
from collections.abc import Container
from typing import Any


def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    none = " (or None)" if optional else ""
    raise ValueError(f"{name}={value!r} must be a positive integer{none}.")


def nonnegative_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name}={value!r} must be an integer >= 0.")


def choice(name: str, value: Any, choices: Container) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not supported; use one of {tuple(choices)}.")


def number_in(name: str, value: Any, low: float, high: float, *, closed: str = "[]") -> None:
  """``value`` is a finite number in the interval from ``low`` to ``high``; ``closed``
  says which ends belong to it, as in interval notation: "[]", "[)", "(]" or "()"."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (low <= value if closed[0] == "[" else low < value)
  ok = ok and (value <= high if closed[1] == "]" else value < high)
  if not ok:
    raise ValueError(f"{name}={value!r} must be a finite number in {closed[0]}{low}, {high}{closed[1]}.")
