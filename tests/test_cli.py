"""Every config field can be set from the command line, optional ones back to None."""

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags

from jaxlab.cli import define_config_flag
from jaxlab.train import base_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.py"))


def parse(config_file, *overrides):
  argv = ["prog", f"--config={config_file}", *overrides]
  flag_values = flags.FlagValues()
  holder = define_config_flag(flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def leaves(config: ml_collections.ConfigDict, prefix=""):
  for key in config:
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", config.get_type(key), value


def another_value(field_type, value):
  """A value of ``field_type`` other than ``value``, and how to write it on the command line."""
  if field_type is bool:
    return (not value), str(not value)
  if field_type is int:
    new = 3 if value is None else value + 1
    return new, str(new)
  if field_type is float:
    new = 0.75 if value is None else value * 2 + 0.25
    return new, repr(new)
  if field_type is str:
    return value + "x" if value else "abc", value + "x" if value else "abc"
  if field_type is tuple:
    return ("a", "b"), "('a', 'b')"
  raise AssertionError(f"no override written for type {field_type}")


def get(config, path):
  for key in path.split("."):
    config = config[key]
  return config


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "base.py"
  path.write_text("from jaxlab.train import base_config\n\n\ndef get_config():\n  return base_config()\n")
  return path


def test_every_base_field_is_settable(base_file):
  fields = list(leaves(base_config()))
  assert len(fields) > 80
  for path, field_type, value in fields:
    new, text = another_value(field_type, value)
    assert get(parse(base_file, f"--config.{path}={text}"), path) == new, path


def test_optional_fields_go_to_none_and_back(base_file):
  optional = [(path, t, v) for path, t, v in leaves(base_config()) if v is None]
  names = {path for path, _, _ in optional}
  assert {"model.sliding_window", "model.head_dim", "model.num_kv_heads", "model.ssm_state",
          "model.polarization", "model.gla_heads", "optim.trainable"} <= names
  for path, field_type, _ in optional + [("train.eval_batches", int, 16)]:
    new, text = another_value(field_type, None)
    assert get(parse(base_file, f"--config.{path}={text}"), path) == new, path
    assert get(parse(base_file, f"--config.{path}=None"), path) is None, path


def test_none_is_a_value_but_lowercase_none_stays_a_string(base_file):
  config = parse(base_file, "--config.model.positional=none", "--config.model.rope_scaling=None")
  assert config.model.positional == "none" and config.model.rope_scaling is None


def written_run(tmp_path):
  """A workdir whose config.json a merge wrote (what from_workdir.py reads)."""
  from jaxlab.train import load_config_module

  config = load_config_module(REPO / "experiments" / "configs" / "merge_small.py").get_config()
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  return f":{tmp_path}"


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.stem)
def test_every_field_of_every_experiment_config_is_settable(config_file, tmp_path):
  """Experiment configs may set optional fields to None; they stay settable."""
  if config_file.stem == "from_workdir":  # its argument: a run's workdir
    config_file = f"{config_file}{written_run(tmp_path)}"
  for path, field_type, value in leaves(parse(config_file)):
    new, text = another_value(field_type, value)
    assert get(parse(config_file, f"--config.{path}={text}"), path) == new, path


@pytest.mark.slow
def test_the_main_job_takes_optional_overrides(tmp_path):
  """The issue's command: a None default set from the command line, and one set back to None."""
  run = subprocess.run(
      [sys.executable, "-m", "jaxlab.main", "--config=experiments/configs/lm_tiny.py",
       f"--workdir={tmp_path}", "--config.model.sliding_window=16", "--config.train.eval_batches=None",
       "--config.train.steps=3", "--config.train.num_samples=0"],
      cwd=REPO, capture_output=True, text=True,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model"]["sliding_window"] == 16 and written["train"]["eval_batches"] is None
