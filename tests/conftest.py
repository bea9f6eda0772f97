"""Test-session setup. Multi-device tests live in tests/multidevice and run in their
own processes (see test_multidevice.py); a plain run does not collect them."""

import os

from jaxlab.aot import set_compile_environment

set_compile_environment()  # before jax starts: TPU and GPU compile targets in the tests

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

collect_ignore_glob = [] if os.environ.get("JAXLAB_MULTIDEVICE") == "1" else ["multidevice/*"]


import pathlib  # noqa: E402

import pytest  # noqa: E402

from jaxlab.train import load_config_module  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def load_config(name: str, *arg: str):
  """``get_config(*arg)`` of experiments/configs/<name>.py."""
  return load_config_module(CONFIGS / f"{name}.py").get_config(*arg)


@pytest.fixture
def tiny_config():
  """A fresh lm_tiny config: a seconds-long run of the whole pipeline."""
  return load_config("lm_tiny")


@pytest.fixture
def experiment_config():
  """``experiment_config(name, *arg)``: a fresh config of experiments/configs/<name>.py."""
  return load_config
