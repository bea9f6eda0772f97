"""Sharding strategies on 8 fake CPU devices: placement, equivalence, resharding, errors."""

import shutil

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlab.sharding import logical_to_spec, strategy_rules
from jaxlab.train import Trainer
from jaxlab.train.checkpoint import state_fingerprint
from jaxlab.train.metrics import read_metrics

MESHES = {
    "dp": dict(data=4, fsdp=2, tensor=1, expert=1),
    "fsdp": dict(data=2, fsdp=4, tensor=1, expert=1),
    "fsdp_tp": dict(data=2, fsdp=2, tensor=2, expert=1),
}


def configure(config, strategy, mesh, steps=3):
  config.sharding.strategy = strategy
  config.mesh = mesh
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, num_samples=0)
  return config


def is_var(x):
  return isinstance(x, nnx.Variable)


def train_losses(workdir):
  return [r["train/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_every_parameter_is_placed_as_the_rules_say(strategy, tiny_config, tmp_path):
  trainer = Trainer(configure(tiny_config, strategy, MESHES[strategy]), tmp_path)
  state = trainer.init_state()
  rules = strategy_rules(strategy)
  variables = jax.tree.leaves((state.params, state.opt_state), is_leaf=is_var)
  variables = [v for v in variables if is_var(v)]
  assert len(variables) == 3 * len(jax.tree.leaves(state.params))  # params, mu, nu
  for var in variables:
    expected = logical_to_spec(var.get_metadata()["out_sharding"], rules)
    assert var[...].sharding.spec == expected, var.get_metadata()
  q = state.params["blocks"][0]["mixer"]["q"]["kernel"][...]  # [embed 32, heads 4, head_dim 8]
  table = state.params["embed"]["table"][...]  # [vocab 264, embed 32]
  if strategy == "dp":
    assert q.sharding.spec == P(None, None, None) and q.addressable_shards[0].data.shape == (32, 4, 8)
  if strategy == "fsdp":
    assert q.sharding.spec == P("fsdp", None, None) and q.addressable_shards[0].data.shape == (8, 4, 8)
  if strategy == "fsdp_tp":
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 2, 8)
    assert table.addressable_shards[0].data.shape == (132, 16)


BLOCK_MIXTURE = dict(block_experts=2, block_top_k=2, block_router="model", block_dense_layers=1)


@pytest.mark.parametrize("model", [{}, BLOCK_MIXTURE], ids=["dense", "block_mixture"])
def test_training_on_a_2x2x2_mesh_matches_one_device(model, tiny_config, tmp_path):
  tiny_config.model.update(model)
  sharded = Trainer(configure(tiny_config.copy_and_resolve_references(), "fsdp_tp", MESHES["fsdp_tp"]),
                    tmp_path / "sharded")
  sharded.run()
  single = Trainer(configure(tiny_config.copy_and_resolve_references(), "fsdp", dict(data=1)),
                   tmp_path / "single", devices=jax.devices()[:1])
  single.run()
  np.testing.assert_allclose(train_losses(tmp_path / "sharded"), train_losses(tmp_path / "single"), rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded.state.params), jax.device_get(single.state.params),
                              atol=1e-5, rtol=1e-5)


def test_checkpoint_from_8_devices_resumes_on_4_with_another_strategy(tiny_config, tmp_path):
  first = configure(tiny_config.copy_and_resolve_references(), "fsdp_tp", MESHES["fsdp_tp"], steps=5)
  first.train.checkpoint_every = 3
  Trainer(first, tmp_path / "a").run()  # checkpoints at 3 and 5
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "5")
  second = configure(tiny_config.copy_and_resolve_references(), "fsdp", dict(data=2, fsdp=2), steps=5)
  second.train.checkpoint_every = 3
  resumed = Trainer(second, tmp_path / "b", devices=jax.devices()[:4])
  summary = resumed.run()
  assert summary["start_step"] == 3 and summary["final_step"] == 5
  assert resumed.state.params["embed"]["table"][...].sharding.spec == P(None, "fsdp")
  np.testing.assert_allclose(train_losses(tmp_path / "b")[3:], train_losses(tmp_path / "a")[3:], rtol=1e-5)


def test_checkpoint_fingerprint_is_the_same_on_every_sharding():
  x = jax.random.normal(jax.random.key(0), (16, 24), jax.numpy.bfloat16)
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  single = state_fingerprint({"x": jax.device_put(x, jax.devices()[0])})
  for spec in (P("a", "b"), P("b", None), P(None, ("a", "b")), P()):
    assert state_fingerprint({"x": jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))}) == single, spec


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model=dict(num_heads=6, num_kv_heads=2, head_dim=8), mesh=dict(data=2, tensor=4)),
         "model.num_heads=6 is not divisible by the tensor mesh axis"),
        (dict(model=dict(mlp_dim=66), mesh=dict(data=2, tensor=4)),
         "model.mlp_dim=66 is not divisible by the tensor mesh axis"),
        (dict(data=dict(batch_size=6), mesh=dict(data=2, fsdp=2, tensor=2)),
         "data.batch_size=6 .* not divisible by data x fsdp x expert = 4"),
        (dict(mesh=dict(data=3)), "has 3 devices but 8 are available"),
        (dict(mesh=dict(data=4, tensor=2), strategy="fsdp"), "mesh.tensor=2, but sharding.strategy='fsdp'"),
    ],
)
def test_impossible_configs_fail_before_compiling(change, message, tiny_config, tmp_path):
  tiny_config.sharding.strategy = change.get("strategy", "fsdp_tp")
  tiny_config.mesh = {**dict(data=1, fsdp=1, tensor=1, expert=1), **change["mesh"]}
  tiny_config.model.update(change.get("model", {}))
  tiny_config.data.update(change.get("data", {}))

  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=message):
      Trainer(tiny_config, tmp_path)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
