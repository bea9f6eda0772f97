"""Runs each file of tests/multidevice in its own process with 8 fake CPU devices
(the device count is fixed when jax starts, so it cannot share this process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = sorted(p.name for p in (HERE / "multidevice").glob("test_*.py"))


@pytest.mark.multidevice
@pytest.mark.parametrize("name", FILES)
def test_multidevice_file(name):
  env = {**os.environ, "JAXLAB_MULTIDEVICE": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
      [sys.executable, "-m", "pytest", str(HERE / "multidevice" / name), "-q", "-rA",
       "-p", "no:cacheprovider"],
      cwd=HERE.parent, env=env, capture_output=True, text=True,
  )
  assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
