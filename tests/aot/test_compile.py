"""Runs compiled for TPU slices and GPUs from this CPU: the steps a run executes, their
per-device memory, the Pallas kernels in them, a config that does not fit, and a
compiled train step saved and loaded."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlab.aot.report import DoesNotFitError, compile_run
from jaxlab.aot.serialize import save_executable
from jaxlab.aot.targets import UnknownTargetError, get_target
from jaxlab.sharding import use_mesh
from jaxlab.train import Trainer
from jaxlab.train.build import build_run
from jaxlab.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
MESHES = {"fsdp": dict(data=1, fsdp=4, tensor=1, expert=1), "fsdp_tp": dict(data=1, fsdp=2, tensor=2, expert=1)}
# config, its argument, and the Pallas kernels its train step must contain
RUNS = {
    "lm_small": ((), {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"}),
    "hybrid_small": ((), {"flash_attention_fwd", "selective_scan_fwd", "ssd_fwd", "gla_fwd"}),
    "ssm_recall": (("mamba_both,4",), {"selective_scan_fwd"}),
}


@pytest.mark.parametrize("name, platform, count, kind", [
    ("v5e-8", "tpu", 8, "TPU v5 lite"), ("v5litepod-16", "tpu", 16, "TPU v5 lite"),
    ("v4-8", "tpu", 4, "TPU v4"), ("v5p-8", "tpu", 4, "TPU v5"), ("v6e:2x2", "tpu", 4, "TPU v6 lite"),
    ("h100x8", "gpu", 8, "NVIDIA H100 80GB HBM3"), ("a100", "gpu", 1, "NVIDIA A100-SXM4-80GB"),
])
def test_targets_by_the_names_people_rent_them_under(name, platform, count, kind):
  target = get_target(name)
  assert (target.platform, len(target.devices), target.devices[0].device_kind) == (platform, count, kind)


def test_an_unknown_target_lists_the_known_ones():
  with pytest.raises(UnknownTargetError, match=r"'v5e-7'.*v5e comes in sizes \[1, 4, 8.*h100"):
    get_target("v5e-7")
  with pytest.raises(UnknownTargetError, match="'tpu9' is not known; known: TPU slices"):
    get_target("tpu9")


@pytest.mark.slow
def test_multi_slice_data_parallelism_spans_the_slices(experiment_config):
  target = get_target("v5e-8", num_slices=2)
  assert target.name == "2 x v5e-8" and len(target.devices) == 16
  config = experiment_config("lm_small")
  config.mesh = dict(data=2, fsdp=8, tensor=1, expert=1)
  setup = build_run(config, target.devices)
  slices = np.vectorize(lambda d: d.slice_index)(setup.mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # data axis = the slice; the rest inside one
  _, report = compile_run(setup, target)
  assert {"flash_attention_fwd", "flash_attention_dq"} <= _kernel_names(report["steps"]["train_step"])
  config.mesh = dict(data=1, fsdp=16, tensor=1, expert=1)
  with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of the 2 slices"):
    build_run(config, target.devices)


def _kernel_names(step):
  return {name.split(".")[0] for name in step["pallas_kernels"]}


@pytest.mark.slow
@pytest.mark.parametrize("run, target_name, strategy", [
    (run, target_name, strategy) for run in sorted(RUNS)
    for target_name, strategy in (("v5e:2x2", "fsdp"), ("v5e:2x2", "fsdp_tp"), ("h100", "fsdp"))
    if (run, target_name) != ("hybrid_small", "h100")])  # its GPU kernels: test_compile_targets.py
def test_runs_compile_with_their_kernels_and_account_for_memory(run, target_name, strategy, experiment_config):
  args, kernels = RUNS[run]
  config = experiment_config(run, *args)
  target = get_target(target_name)
  config.sharding.strategy = strategy
  config.mesh = MESHES[strategy] if len(target.devices) == 4 else dict(data=1, fsdp=1, tensor=1, expert=1)
  setup = build_run(config, target.devices)
  _, report = compile_run(setup, target)
  train = report["steps"]["train_step"]
  assert kernels <= _kernel_names(train), train["pallas_kernels"]
  assert set(report["steps"]) == {"train_step", "eval_step", "decode_step"}
  # Parameters: every one counted once, divided by the devices its sharding splits it over.
  per = report["per_device_bytes"]
  params = jax.tree.leaves(setup.abstract_state().params)
  expected = sum(math.prod(p.shape) * p.dtype.itemsize // math.prod(
      setup.mesh.shape[a] for axes in p.sharding.spec if axes for a in ((axes,) if isinstance(axes, str) else axes))
      for p in params)
  assert per["params"] == expected
  if run == "lm_small" and strategy == "fsdp" and len(target.devices) == 4:
    total = sum(math.prod(p.shape) * 4 for p in params)
    assert total / 4 <= per["params"] < total / 4 * 1.02  # all but the norm scales split 4 ways
  # The compiler's own argument size: the donated state and the batch, nothing else.
  assert train["alias_bytes"] >= per["params"] + per["opt_state"]
  assert train["argument_bytes"] >= per["params"] + per["opt_state"] + per["batch"]
  if target.platform == "gpu":
    assert train["argument_bytes"] - (per["params"] + per["opt_state"] + per["batch"]) < 64


@pytest.mark.slow
def test_a_config_that_does_not_fit_says_so_with_the_compilers_numbers(experiment_config, tmp_path):
  big = ["--config.model.d_model=8192", "--config.model.num_layers=8", "--config.model.mlp_dim=32768",
         "--config.model.num_heads=64", "--config.model.num_kv_heads=8"]
  run = subprocess.run([sys.executable, "-m", "jaxlab.compile", "--config=experiments/configs/lm_small.py",
                        "--target=v5e:2x2", *big], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 1
  assert "does not fit: train_step does not fit on v5e:2x2" in run.stderr
  assert "exceeds available HBM" in run.stderr and "--config.model.remat=full" in run.stderr
  assert "Traceback" not in run.stderr
  # On GPUs XLA compiles whatever it is given; the check against the device is jaxlab's.
  config = experiment_config("lm_small")
  config.model.update(d_model=8192, num_layers=8, mlp_dim=32768, num_heads=64, num_kv_heads=8)
  target = get_target("h100")
  with pytest.raises(DoesNotFitError, match=r"train_step does not fit on h100: it needs [\d.]+ GiB per device"):
    compile_run(build_run(config, target.devices), target)


def test_unknown_target_on_the_command_line_is_an_error_not_a_traceback():
  run = subprocess.run([sys.executable, "-m", "jaxlab.compile", "--config=experiments/configs/lm_tiny.py",
                        "--target=v9-8"], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 1 and "--target='v9-8' is not known; known:" in run.stderr
  assert "Traceback" not in run.stderr


def test_a_saved_train_step_loads_and_trains_as_the_jitted_one(tiny_config, tmp_path):
  """The CPU stands in for the hardware: compile, save, and run from the file."""
  tiny_config.train.update(steps=4, eval_every=100, checkpoint_every=100, num_samples=0)
  setup = build_run(tiny_config, jax.devices())
  with use_mesh(setup.mesh, setup.rules):
    compiled = setup.train_step.lower(setup.abstract_state(), setup.abstract_batch()).compile()
  path = save_executable(compiled, tmp_path / "train_step.xla")
  assert path == str(tmp_path / "train_step.xla")
  Trainer(tiny_config, tmp_path / "jitted").run()
  tiny_config.train.compiled_train_step = path
  loaded = Trainer(tiny_config, tmp_path / "loaded")
  assert isinstance(loaded.train_step, jax.stages.Compiled)
  loaded.run()
  losses = [[r["train/loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "train/loss" in r]
            for d in ("jitted", "loaded")]
  np.testing.assert_array_equal(losses[0], losses[1])


@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["v5e-8", "h100x8"])
def test_expert_parallel_moe_train_step_compiles(target_name, experiment_config):
  """moe_small (one of its layers) with its 8 experts split 4 ways and FSDP over 2: the
  grouped-matmul kernels and the ragged token exchange are in the compiled train step."""
  config = experiment_config("moe_small")
  config.model.num_layers = 1
  config.sharding.strategy = "fsdp_ep"
  config.mesh = dict(data=1, fsdp=2, tensor=1, expert=4)
  target = get_target(target_name)
  setup = build_run(config, target.devices)
  _, report = compile_run(setup, target)
  train = report["steps"]["train_step"]
  assert {"gmm", "tgmm"} <= _kernel_names(train), train["pallas_kernels"]
  assert train["collectives"]["ragged-all-to-all"] >= 2  # there and back
  expert_weights = setup.abstract_state().params["blocks"][0]["ffn"]["experts"]["up"]
  assert expert_weights.sharding.spec[0] == "expert"
