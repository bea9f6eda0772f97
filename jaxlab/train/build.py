"""Building a run from its config: mesh, rules, optimizer, abstract state and shardings,
and the jitted train, eval and decode steps. `Trainer`, ``jaxlab.compile`` and the tests
all build runs here, so a compiled step is the step a run executes."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from jaxlab.aot.serialize import load_executable
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.sharding import (
    Rules, check_batch, check_divisible, check_expert_axis, check_mesh_use, logical_to_spec, make_mesh, strategy_rules,
    use_mesh,
)
from jaxlab.sharding.rules import spec_size
from jaxlab.train.checkpoint import restore_target
from jaxlab.train.config import check_run_config
from jaxlab.train.optim import make_optimizer
from jaxlab.train.state import abstract_train_state, model_graphdef, state_shardings
from jaxlab.train.step import COMPUTE_DTYPES, cast_floating, eval_step, train_step


def model_config_fields(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
  """Which config fields set each logical dimension, for sharding errors."""
  mixers = set(config.mixers)
  fields = {
      "heads": [("model.num_heads", config.num_heads)],
      "kv_heads": [("model.num_kv_heads", config.kv_heads)],
      "mlp": [("model.mlp_dim", config.mlp_dim)],
      "expert": [("model.moe_num_experts", config.moe_num_experts)],
      "vocab": [("model.vocab_size", config.vocab_size)],
      "embed": [("model.d_model", config.d_model)],
  }
  if "moe" in config.ffns:
    fields["mlp"].append(("model.moe_expert_dim", config.expert_dim))
    if config.shared_dim:
      fields["mlp"].append(("the shared MLP's width (model.moe_shared_dim)", config.shared_dim))
  if mixers & {"mamba", "mamba2"}:
    fields["mlp"].append(("model.ssm_expand x model.d_model", config.ssm_inner))
  if "mamba2" in mixers:
    fields["heads"].append((f"mamba2's head count (model.ssm_expand x model.d_model / model.ssm_head_dim = "
                            f"{config.ssm_inner} / {config.ssm_head_dim})", config.ssm_heads))
  if "gla" in mixers:
    fields["heads"].append(("model.gla_heads", config.gla_num_heads))
  return fields


def decode_step(params: Any, model_state: Any, tokens: Int[Array, "b 1"], cache: Any, *,
                graphdef: nnx.GraphDef, compute_dtype: str) -> tuple[Float[Array, "b v"], Any]:
  """One token of generation: the next-token logits ``[b, vocab]`` and the new cache."""
  model = nnx.merge(graphdef, cast_floating(params, COMPUTE_DTYPES[compute_dtype]), model_state)
  logits, cache = model.decode(tokens, cache)
  return logits[:, -1], cache


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """A run's devices, shardings and jitted steps; nothing in it holds device memory."""

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  mesh: Mesh
  rules: Rules
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract: Any  # the TrainState as ShapeDtypeStructs (variables keep their metadata)
  graphdef: nnx.GraphDef
  shardings: Any  # NamedSharding per TrainState leaf
  batch_sharding: NamedSharding
  train_step: Any  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Any  # jitted (state, batch) -> sums
  decode_step: Any  # jitted (params, model_state, tokens [b, 1], cache) -> (logits, cache)

  def abstract_state(self) -> Any:
    """The TrainState as ShapeDtypeStructs carrying their shardings."""
    return restore_target(self.abstract, self.shardings)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as ShapeDtypeStructs: ``inputs``, ``targets``, ``weights``."""
    shape = (self.config.data.batch_size, self.config.data.seq_len)
    spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)  # noqa: E731
    return {"inputs": spec(jnp.int32), "targets": spec(jnp.int32), "weights": spec(jnp.float32)}

  def abstract_decode_inputs(self, batch: int, max_len: int) -> tuple[Any, jax.ShapeDtypeStruct]:
    """The cache for ``batch`` sequences of up to ``max_len`` tokens and one token per
    sequence, as ShapeDtypeStructs: leaves with a leading batch dimension split over
    the mesh axes ``batch`` maps to where it divides, the rest replicated."""
    dtype = COMPUTE_DTYPES[self.config.train.compute_dtype]
    cache = jax.eval_shape(lambda: nnx.eval_shape(
        lambda: Transformer(self.model_config, rngs=nnx.Rngs(0))).init_cache(batch, max_len, dtype))
    batch_axes = logical_to_spec(("batch",), self.rules)[0]
    shards = spec_size(PartitionSpec(batch_axes), self.mesh.shape)[0]

    def place(x):
      split = x.ndim > 0 and x.shape[0] == batch and batch % shards == 0
      spec = PartitionSpec(batch_axes) if split else PartitionSpec()
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, spec))

    return jax.tree.map(place, cache), place(jax.ShapeDtypeStruct((batch, 1), jnp.int32))


def build_run(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> RunSetup:
  """Checks the config against ``devices`` (default: this process's backend) and
  builds the run's mesh, shardings and steps without allocating anything."""
  check_run_config(config)
  model_config = ModelConfig.from_dict(config.model)
  train = config.train
  mesh = make_mesh(dict(config.mesh), devices)
  rules = strategy_rules(config.sharding.strategy)
  check_mesh_use(mesh, rules, config.sharding.strategy)
  check_expert_axis(mesh, config.sharding.strategy, "moe" in model_config.ffns)
  check_batch(config.data.batch_size, train.grad_accum, mesh, rules)
  tx, schedule = make_optimizer(config.optim, train.steps, lora=model_config.lora_rank > 0)
  abstract = abstract_train_state(model_config, tx, config.seed)
  check_divisible(abstract, mesh, rules, model_config_fields(model_config))
  graphdef = model_graphdef(model_config)
  shardings = state_shardings(abstract, mesh, rules)
  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))
  replicated = NamedSharding(mesh, PartitionSpec())
  setup = RunSetup(
      config=config, model_config=model_config, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
      abstract=abstract, graphdef=graphdef, shardings=shardings, batch_sharding=batch_sharding,
      train_step=jax.jit(
          functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                            grad_accum=train.grad_accum, compute_dtype=train.compute_dtype),
          in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
          donate_argnums=0,
      ),
      eval_step=jax.jit(
          functools.partial(eval_step, graphdef=graphdef, compute_dtype=train.compute_dtype),
          in_shardings=(shardings, batch_sharding),
      ),
      decode_step=jax.jit(
          functools.partial(decode_step, graphdef=graphdef, compute_dtype=train.compute_dtype),
          in_shardings=(shardings.params, shardings.model_state, None, None), donate_argnums=3,
      ),
  )
  if train.compiled_train_step is None:
    return setup
  args = (setup.abstract_state(), setup.abstract_batch())
  with use_mesh(mesh, rules):
    loaded = load_executable(train.compiled_train_step, setup.train_step, args, list(mesh.devices.flat))
  return dataclasses.replace(setup, train_step=loaded)
