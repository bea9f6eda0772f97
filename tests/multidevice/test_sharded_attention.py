"""Flash attention under a mesh runs inside shard_map over batch and heads, and gives
the same numbers as on one device."""

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
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference


def test_kernel_is_shard_mapped_over_batch_and_heads():
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = strategy_rules("fsdp_tp")
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (4, 48, 4, 64))
  k = jax.random.normal(keys[1], (4, 48, 2, 64))
  v = jax.random.normal(keys[2], (4, 48, 2, 64))
  with use_mesh(mesh, rules):
    spec = P(("data", "fsdp", "expert"), None, "tensor", None)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))

    def loss(q, k, v):
      out = flash_attention(q, k, v, causal=True, sliding_window=20, implementation="pallas_interpret",
                            batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads"))
      return jnp.sum(out * out), out

    assert "shard_map" in str(jax.make_jaxpr(loss)(q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  ref_loss = lambda q, k, v: jnp.sum(attention_reference(q, k, v, causal=True, sliding_window=20) ** 2)  # noqa: E731
  chex.assert_trees_all_close(out, attention_reference(q, k, v, causal=True, sliding_window=20), atol=1e-5)
  chex.assert_trees_all_close(grads, jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v), atol=1e-4)


def test_training_with_the_kernel_on_a_mesh_matches_the_xla_path(tiny_config, tmp_path):
  losses = {}
  for impl in ("xla", "pallas_interpret"):
    config = tiny_config.copy_and_resolve_references()
    config.model.attention_impl = impl
    config.sharding.strategy = "fsdp_tp"
    config.mesh = dict(data=2, fsdp=2, tensor=2, expert=1)
    config.train.update(steps=3, eval_every=3, checkpoint_every=3, num_samples=0)
    Trainer(config, tmp_path / impl).run()
    losses[impl] = [r["train/loss"] for r in read_metrics(tmp_path / impl / "metrics.jsonl") if "train/loss" in r]
  np.testing.assert_allclose(losses["pallas_interpret"], losses["xla"], rtol=1e-5)


def test_tpu_interpreter_under_a_mesh_is_refused_not_deadlocked():
  """jax's TPU interpreter holds all devices at a barrier, which deadlocks on CPU devices."""
  q = jnp.zeros((4, 16, 2, 64))
  with use_mesh(make_mesh(dict(data=2, fsdp=2, tensor=2)), strategy_rules("fsdp_tp")):
    with pytest.raises(ValueError, match="interpret_backend='gpu'"):
      flash_attention(q, q, q, implementation="pallas_interpret", interpret_backend="tpu")
