"""MoE layers on 8 fake CPU devices: experts split over the expert axis (tokens
exchanged with all_to_all inside shard_map), with and without tensor parallelism inside
each expert, equal one device in outputs and gradients; a MoE LM trains on a 2x2x2 mesh
with the losses of one device; configs that cannot split name the field."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig
from jaxlab.nn.moe import MoE
from jaxlab.nn.reports import capture_reports
from jaxlab.sharding import make_mesh, strategy_rules, use_mesh
from jaxlab.train import Trainer
from jaxlab.train.metrics import read_metrics
from jaxlab.train.state import state_shardings

CONFIG = ModelConfig(d_model=32, num_heads=4, ffns=("moe",), moe_num_experts=8, moe_top_k=2,
                     moe_expert_dim=48, moe_shared_experts=1)
BATCH = ("data", "fsdp", "expert")


def value_and_grads(config, x, mesh=None, strategy=None):
  moe = MoE(config, layer=0, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  if mesh is None:
    return fn(params, x), None
  rules = strategy_rules(strategy)
  params = jax.device_put(params, state_shardings(params, mesh, rules))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH)))
  with use_mesh(mesh, rules):
    jaxpr = str(jax.make_jaxpr(loss)(params, x))
    return fn(params, x), (params, jaxpr)


@pytest.mark.parametrize("mesh, strategy", [
    (dict(expert=8), "fsdp_ep"),
    (dict(expert=4, tensor=2), "fsdp_tp_ep"),
    (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
], ids=["ep8", "ep4_tp2", "fsdp_tp"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sharded_layer_equals_one_device(mesh, strategy, dispatch):
  config = dataclasses.replace(CONFIG, moe_dispatch=dispatch, moe_capacity_factor=1.0)
  x = jax.random.normal(jax.random.key(1), (8, 12, 32))
  want, _ = value_and_grads(config, x)
  got, (params, jaxpr) = value_and_grads(config, x, make_mesh(mesh), strategy)
  assert "shard_map" in jaxpr and ("all_to_all" in jaxpr) == ("expert" in mesh)
  chex.assert_trees_all_close(jax.device_get(got), want, atol=1e-5, rtol=1e-5)
  shard = params["experts"]["up"][...].addressable_shards[0].data.shape
  assert shard[0] == 8 // mesh.get("expert", 1) and shard[2] == 48 // mesh.get("tensor", 1)


def _configure(config, mesh, strategy, num_samples=0):
  config.model.update(ffns=("mlp", "moe"), moe_num_experts=4, moe_expert_dim=32, moe_router="sigmoid")
  config.sharding.strategy = strategy
  config.mesh = mesh
  config.train.update(steps=3, eval_every=3, checkpoint_every=3, num_samples=num_samples)
  return config


def test_moe_lm_on_a_2x2x2_mesh_matches_one_device(tiny_config, tmp_path):
  # 2 sample prompts do not split over the 4 batch shards: the MoE layers take them whole
  sharded = Trainer(_configure(tiny_config.copy_and_resolve_references(), dict(fsdp=2, tensor=2, expert=2),
                               "fsdp_tp_ep", num_samples=2), tmp_path / "sharded")
  sharded.write_report(sharded.run())  # the report generates from the sample prompts
  single = Trainer(_configure(tiny_config.copy_and_resolve_references(), dict(data=1), "fsdp"),
                   tmp_path / "single", devices=jax.devices()[:1])
  single.run()
  records = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("sharded", "single")}
  for key in ("train/loss", "train/ffn/weighted_aux_loss/layer_1", "train/ffn/expert_load/layer_1/0"):
    values = [[r[key] for r in records[name] if key in r] for name in ("sharded", "single")]
    np.testing.assert_allclose(*values, rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close(jax.device_get(sharded.state.params), jax.device_get(single.state.params),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded.state.model_state),
                              jax.device_get(single.state.model_state), atol=1e-6)
  assert (tmp_path / "sharded" / "samples.txt").read_text().count("--- continuation ---") == 2


@pytest.mark.parametrize("mesh, strategy, fields, message", [
    (dict(data=2, expert=4), "fsdp_ep", dict(moe_num_experts=6),
     "model.moe_num_experts=6 is not divisible by the expert mesh axis"),
    (dict(data=4, fsdp=2), "fsdp_ep", {}, "mesh.expert=1"),
    (dict(data=2, expert=4), "fsdp_ep", dict(ffns=("mlp",)), "has no 'moe'"),
])
def test_moe_configs_that_do_not_split_name_the_field(mesh, strategy, fields, message, tiny_config, tmp_path):
  config = _configure(tiny_config, mesh, strategy)
  config.model.update(**fields)
  with pytest.raises(ValueError, match=message):
    Trainer(config, tmp_path)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` as documented, from all_gather (XLA:CPU lacks the op):
  peer i's rows ``[input_offsets[me], + send_sizes[me])`` land in my output at
  ``output_offsets[me]`` (as peer i computed it); ``recv_sizes`` must agree."""
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)
  starts, sizes, at = (jax.lax.all_gather(v, axis_name)[:, me] for v in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  inside = (rows[None, :] >= at[:, None]) & (rows[None, :] < (at + sizes)[:, None])
  source = jnp.argmax(inside, axis=0)
  read = jnp.clip(starts[source] + rows - at[source], 0, operand.shape[0] - 1)
  checked = jnp.where(jnp.all(sizes == recv_sizes), operands[source, read], jnp.nan)
  return jnp.where(jnp.any(inside, axis=0)[:, None], checked, output)


def test_ragged_exchange_equals_the_padded_one():
  """The offsets of the ragged exchange (what TPUs and GPUs run) against the padded
  all_to_all exchange, on skewed loads that leave some experts empty."""
  from jaxlab.nn.moe import exchange_padded, exchange_ragged

  mesh = make_mesh(dict(expert=8))
  experts, m, d = 16, 40, 8
  w = jax.random.normal(jax.random.key(2), (experts, d, d))
  keys = jax.random.split(jax.random.key(3), 8)
  chosen = jnp.stack([jnp.sort(jax.random.randint(k, (m,), 0, experts) * (i % 3 != 0)) for i, k in enumerate(keys)])
  sizes = jax.vmap(lambda e: jnp.bincount(e, length=experts))(chosen).astype(jnp.int32)
  xs = jax.random.normal(jax.random.key(4), (8, m, d))
  P = jax.sharding.PartitionSpec

  def run(exchange):
    def local(xs, sizes, w):
      ffn = lambda rows, s: gmm(rows, w, s, implementation="xla")  # noqa: E731
      return exchange(ffn, xs[0], sizes[0], "expert", 8)[None]
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("expert"), P("expert"), P("expert")),
                                 out_specs=P("expert"), check_vma=False))(xs, sizes, w)

  from pallas_kernels.gmm.ops import gmm

  want = jax.vmap(lambda x, s: gmm(x, w, s, implementation="reference"))(xs, sizes)
  padded = run(exchange_padded)
  ragged = run(lambda *a: exchange_ragged(*a, ragged_all_to_all=emulated_ragged_all_to_all))
  np.testing.assert_allclose(padded, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ragged, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["dense_to_sparse", "pregate"])
def test_dense_phase_and_pregated_experts_shard_like_one_device(router):
  """A dense-to-sparse router before its switch (every expert on every token, in training)
  and Read-ME's pre-gated experts, split over 8 expert shards, equal one device."""
  config = dataclasses.replace(CONFIG, moe_router=router, moe_dts_gate="activation",
                               moe_top_k=1 if router == "pregate" else 2)
  x = jax.random.normal(jax.random.key(2), (8, 12, 32))
  experts = jax.random.randint(jax.random.key(3), (8, 12), 0, 8)
  moe = MoE(config, layer=0, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

  def loss(params, x):
    layer = nnx.merge(graphdef, params, rest)
    if router == "pregate":
      return jnp.sum(layer(x, experts) ** 2)
    return jnp.sum(capture_reports(layer, x, rng=jax.random.key(4))[0] ** 2)

  fn = jax.jit(jax.value_and_grad(loss))
  want = fn(params, x)
  mesh, rules = make_mesh(dict(expert=8)), strategy_rules("fsdp_ep")
  params = jax.device_put(params, state_shardings(params, mesh, rules))
  with use_mesh(mesh, rules):
    got = fn(params, jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH))))
  chex.assert_trees_all_close(jax.device_get(got), want, atol=1e-5, rtol=1e-5)
