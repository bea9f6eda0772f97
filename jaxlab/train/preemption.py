"""SIGTERM / SIGINT become a request to checkpoint and stop at the next step boundary."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
  """Context manager that records SIGTERM and SIGINT instead of dying mid-step.

  A second SIGINT while a stop is pending raises KeyboardInterrupt as usual.
  `requested()` agrees across hosts: any host's signal stops every host.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._flag = threading.Event()
    self._previous = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self._flag.is_set():
      raise KeyboardInterrupt
    self._flag.set()

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local))
    return bool(np.any(flags))
