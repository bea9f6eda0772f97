"""Test-session setup. Multi-device tests live in tests/multidevice and run in their
own processes (see test_multidevice.py); a plain run does not collect them."""

import os

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

collect_ignore_glob = [] if os.environ.get("JAXLAB_MULTIDEVICE") == "1" else ["multidevice/*"]


import pathlib  # noqa: E402

import pytest  # noqa: E402

from jaxlab.train import load_config_module  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def load_config(name: str):
  """``get_config()`` of experiments/configs/<name>.py."""
  return load_config_module(CONFIGS / f"{name}.py").get_config()


@pytest.fixture
def tiny_config():
  """A fresh lm_tiny config: a seconds-long run of the whole pipeline."""
  return load_config("lm_tiny")
