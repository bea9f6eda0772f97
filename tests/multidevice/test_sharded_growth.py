"""Growth on 8 fake CPU devices: a run grows a smaller run's sharded checkpoint straight
into its own shardings, and the result equals growing the gathered parameters on one
host; LiGO's operator training gives the same operator under any strategy."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab.growth import grow
from jaxlab.growth.trees import by_name
from jaxlab.nn import ModelConfig
from jaxlab.sharding import logical_to_spec, strategy_rules
from jaxlab.train import Trainer, load_config_module

FSDP_TP = dict(data=2, fsdp=2, tensor=2, expert=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A two-step lm_tiny run on an fsdp mesh, which the tests grow (read-only)."""
  config = load_config_module(Path(__file__).resolve().parents[2] / "experiments/configs/lm_tiny.py").get_config()
  config.sharding.strategy, config.mesh = "fsdp", dict(data=2, fsdp=4, tensor=1, expert=1)
  config.train.update(steps=2, eval_every=2, checkpoint_every=2, num_samples=0)
  config.optim.warmup_steps = 1
  trainer = Trainer(config, tmp_path_factory.mktemp("small"))
  trainer.run()
  return trainer


def grown_config(config, workdir, **init):
  large = config.copy_and_resolve_references()
  large.model.update(num_layers=2 * config.model.num_layers, d_model=2 * config.model.d_model,
                     num_heads=2 * config.model.num_heads, mlp_dim=2 * config.model.mlp_dim)
  large.sharding.strategy, large.mesh = "fsdp_tp", FSDP_TP
  large.init.update(grow_from=str(workdir), **init)
  return large


def test_sharded_growth_equals_growing_on_one_host(small, tmp_path):
  """AKI: Net2Net's copies and divisions, new units from the next layer, stacking."""
  operator, tiny_config = "aki", small.config
  host_params = jax.device_get(small.state.params)
  large = grown_config(tiny_config, small.workdir, operator=operator)
  trainer = Trainer(large, tmp_path / "large")
  state = trainer.init_state()
  expected = by_name(grow(host_params, ModelConfig.from_dict(tiny_config.model), trainer.model_config, operator,
                          seed=large.seed))
  rules = strategy_rules("fsdp_tp")
  for path, var in nnx.to_flat_state(state.params):
    name = "/".join(map(str, path))
    np.testing.assert_allclose(np.asarray(var.get_value()), np.asarray(expected[name]), rtol=1e-6, atol=1e-7,
                               err_msg=name)
    assert var.get_value().sharding.spec == logical_to_spec(var.get_metadata()["out_sharding"], rules), name


def test_ligo_trains_the_same_operator_on_any_mesh(small, tmp_path):
  tiny_config, losses = small.config, {}
  for strategy, mesh in [("fsdp_tp", FSDP_TP), ("dp", dict(data=8, fsdp=1, tensor=1, expert=1))]:
    large = grown_config(tiny_config, small.workdir, operator="ligo", ligo_steps=2, ligo_lr=1e-2, ligo_warmup=1)
    large.sharding.strategy, large.mesh = strategy, mesh
    trainer = Trainer(large, tmp_path / strategy)
    trainer.init_state(iter(trainer.train_data))
    losses[strategy] = json.loads((tmp_path / strategy / "init.json").read_text())["ligo_loss"]
  np.testing.assert_allclose(losses["fsdp_tp"], losses["dp"], rtol=2e-5)
