"""Two processes on localhost (gloo collectives, 4 fake devices each) train like one
process with 8 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxlab.train import Trainer
from jaxlab.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
             "--config.train.num_samples=2", "--config.sharding.strategy=fsdp_tp",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_match_one_host(tiny_config, tmp_path):
  workdir = tmp_path / "multihost"
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  command = [sys.executable, "-m", "jaxlab.main", "--config=experiments/configs/lm_tiny.py",
             f"--workdir={workdir}", *OVERRIDES]
  # Host 0 joins through flags, host 1 through the environment.
  by_flags = [f"--config.distributed.coordinator_address=localhost:{port}",
              "--config.distributed.num_processes=2", "--config.distributed.process_id=0"]
  by_env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1"}
  procs = [
      subprocess.Popen(command + by_flags, cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True),
      subprocess.Popen(command, cwd=REPO, env={**env, **by_env}, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True),
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]

  tiny_config.train.update(steps=4, checkpoint_every=2, eval_every=2, num_samples=2)
  tiny_config.sharding.strategy = "fsdp_tp"
  tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
  Trainer(tiny_config, tmp_path / "single").run()

  multi, single = read_metrics(workdir / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
  for key in ("train/loss", "eval/loss"):
    a = [r[key] for r in multi if key in r]
    b = [r[key] for r in single if key in r]
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5)
  step_dir = workdir / "checkpoints" / "4"
  assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  assert (workdir / "samples.txt").exists()
