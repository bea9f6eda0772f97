"""Recurrent mixers on 8 fake CPU devices: the scan kernels run inside shard_map over
batch and channels/heads, a hybrid model trains on a 2x2x2 mesh exactly as on one
device, and configs that do not split fail with the field to change."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.sharding import make_mesh, mesh_axes_of, strategy_rules, use_mesh
from jaxlab.train import Trainer
from jaxlab.train.metrics import read_metrics
from pallas_kernels.gla.ops import gla
from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd

HYBRID = dict(mixers=("mamba", "mamba2", "gla"), num_layers=3, ssm_state=8, ssm_head_dim=16,
              ssm_chunk=16, gla_heads=2, polarization="both")
BATCH = ("data", "fsdp", "expert")


def _sharded(mesh, spec, *arrays):
  return tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x in arrays)


def test_scans_are_shard_mapped_and_exact():
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  keys = jax.random.split(jax.random.key(0), 8)
  u, delta = (jax.random.normal(k, (4, 40, 8)) for k in keys[:2])
  A = -jnp.exp(jax.random.normal(keys[2], (8, 4)))
  B, C = (jax.random.normal(k, (4, 40, 4)) for k in keys[3:5])
  x = jax.random.normal(keys[5], (4, 40, 4, 16))
  dt = jax.nn.softplus(jax.random.normal(keys[6], (4, 40, 4)))
  log_g = jax.nn.log_sigmoid(jax.random.normal(keys[7], (4, 40, 4, 16)))
  with use_mesh(mesh, strategy_rules("fsdp_tp")):
    calls = {
        "selective_scan": (lambda u, delta, A, B, C, impl: selective_scan(
            u, delta, A, B, C, delta_softplus=True, implementation=impl, chunk_size=16,
            batch_axes=mesh_axes_of("batch"), channel_axes=mesh_axes_of("mlp")),
            (*_sharded(mesh, P(BATCH, None, "tensor"), u, delta), *_sharded(mesh, P("tensor"), A),
             *_sharded(mesh, P(BATCH), B, C))),
        "ssd": (lambda x, dt, A, B, C, impl: ssd(
            x, dt, A, B[:, :, None], C[:, :, None], chunk_size=16, implementation=impl,
            batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads")),
            (*_sharded(mesh, P(BATCH, None, "tensor"), x, dt), *_sharded(mesh, P("tensor"), A[:4, 0]),
             *_sharded(mesh, P(BATCH), B, C))),
        "gla": (lambda q, k, v, g, impl: gla(
            q, k, v, g, chunk_size=16, implementation=impl,
            batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads")),
            _sharded(mesh, P(BATCH, None, "tensor"), x, x * 0.5, x, log_g)),
    }
    for name, (fn, args) in calls.items():
      loss = lambda *a, fn=fn: jnp.sum(fn(*a, "pallas_interpret") ** 2)  # noqa: E731
      assert "shard_map" in str(jax.make_jaxpr(loss)(*args)), name
      got = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
      want = jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a, "sequential") ** 2),
                                argnums=tuple(range(len(args))))(*jax.device_get(args))
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # relative to each leaf's scale
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(w)))), name


def _configure(config, mesh, strategy="fsdp_tp"):
  config.model.update(**HYBRID)
  config.sharding.strategy = strategy
  config.mesh = mesh
  config.train.update(steps=3, eval_every=3, checkpoint_every=3, num_samples=0)
  return config


def test_hybrid_model_on_a_2x2x2_mesh_matches_one_device(tiny_config, tmp_path):
  sharded = Trainer(_configure(tiny_config.copy_and_resolve_references(), dict(data=2, fsdp=2, tensor=2)),
                    tmp_path / "sharded")
  sharded.run()
  single = Trainer(_configure(tiny_config.copy_and_resolve_references(), dict(data=1), "fsdp"),
                   tmp_path / "single", devices=jax.devices()[:1])
  single.run()
  losses = [[r["train/loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/loss" in r]
            for name in ("sharded", "single")]
  np.testing.assert_allclose(*losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded.state.params), jax.device_get(single.state.params),
                              atol=1e-5, rtol=1e-5)
  a_log = sharded.state.params["blocks"][0]["mixer"]["A_log"][...]  # mamba: [inner 64, state 8]
  assert a_log.sharding.spec == P("tensor", None) and a_log.addressable_shards[0].data.shape == (32, 8)


@pytest.mark.parametrize("fields,message", [
    (dict(gla_heads=1, mixers=("gla",), polarization=None), "model.gla_heads=1 is not divisible by the tensor mesh axis"),
    (dict(mixers=("mamba2",), ssm_head_dim=64, polarization=None),
     r"mamba2's head count \(model.ssm_expand x model.d_model / model.ssm_head_dim = 64 / 64\)=1 is not divisible"),
])
def test_recurrent_configs_that_do_not_split_name_the_field(fields, message, tiny_config, tmp_path):
  config = _configure(tiny_config, dict(data=2, fsdp=2, tensor=2))
  config.model.update(**fields)
  with pytest.raises(ValueError, match=message):
    Trainer(config, tmp_path).run()
