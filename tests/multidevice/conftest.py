import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def eight_devices():
  assert jax.device_count() == 8, "run through tests/test_multidevice.py (8 fake CPU devices)"
