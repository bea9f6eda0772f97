"""Merging on 8 fake CPU devices: every method runs under jit on states sharded over an
fsdp x tensor mesh, never gathered to a host, and equals merging on one host."""

from pathlib import Path

import chex
import jax
import pytest

from jaxlab.growth.trees import by_name
from jaxlab.merging import merge
from jaxlab.sharding import use_mesh
from jaxlab.train import load_config_module
from jaxlab.train.build import build_run
from jaxlab.train.state import create_train_state


@pytest.fixture(scope="module")
def sharded():
  config = load_config_module(Path(__file__).resolve().parents[2] / "experiments/configs/lm_tiny.py").get_config()
  config.sharding.strategy, config.mesh = "fsdp_tp", dict(data=2, fsdp=2, tensor=2, expert=1)
  setup = build_run(config)
  with use_mesh(setup.mesh, setup.rules):
    states = [create_train_state(setup.model_config, setup.tx, seed, setup.shardings).params for seed in range(3)]
  return setup, states


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "task_arithmetic", "slerp"])
def test_sharded_merge_keeps_shardings_and_equals_the_host_merge(sharded, method):
  setup, (base, a, b) = sharded
  options = dict(base=base, density=0.3, seed=1) if method != "slerp" else dict(t=0.3)
  run = lambda a, b, base: merge([a, b], method, **options) if method != "slerp" else merge([a, b], method, t=0.3)
  # Elementwise methods keep every parameter's sharding by themselves; TIES' top-k and
  # DARE's masks may be laid out otherwise by XLA, so the caller names the output's.
  elementwise = method in ("linear", "task_arithmetic", "slerp")
  merged = jax.jit(run, out_shardings=None if elementwise else setup.shardings.params)(a, b, base)
  for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(a)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
  host = jax.device_get((a, b, base))
  expected = merge(list(host[:2]), method, **({**options, "base": host[2]} if method != "slerp" else options))
  chex.assert_trees_all_close(by_name(jax.device_get(merged)), by_name(expected), atol=1e-6, rtol=1e-5)
