"""Signals become a stop request; a second SIGINT still interrupts."""

import os
import signal

import pytest

from jaxlab.train.preemption import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_requests_a_stop_instead_of_killing(sig):
  before = signal.getsignal(sig)
  with StopRequest() as stop:
    assert not stop.requested()
    os.kill(os.getpid(), sig)
    assert stop.requested()
  assert signal.getsignal(sig) == before


def test_second_sigint_interrupts():
  with StopRequest():
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
