"""The train state, created already sharded: parameters, optimizer state, step, RNG."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxlab.nn import ModelConfig, Transformer
from jaxlab.sharding import Rules, named_sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State  # trainable variables (nnx.Param), each with logical axis names
  model_state: nnx.State  # every other variable of the model (none for the LM today)
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] raw key, split once per step for stochastic layers


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def path_name(path) -> str:
  """A tree path as 'params/blocks/0/mixer/q/kernel' (no trailing 'value')."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def model_graphdef(model_config: ModelConfig) -> nnx.GraphDef:
  """The static structure of the model, from an abstract (allocation-free) instance."""
  return nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))


def init_train_state(model_config: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state; call it under ``jax.jit`` with output shardings (see `create_train_state`)."""
  params_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  model = Transformer(model_config, rngs=nnx.Rngs(params=params_key))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      opt_state=tx.init(params), rng=train_key,
  )


def state_shardings(abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a state tree: variables by their logical names, the rest replicated.

  Optimizer moments are trees of the same variables, so they shard like the parameters.
  """

  def leaf(x):
    names = x.get_metadata().get("out_sharding") if is_variable(x) else None
    return named_sharding(mesh, names, rules)

  return jax.tree.map(leaf, abstract, is_leaf=is_variable)


def abstract_train_state(model_config: ModelConfig, tx: optax.GradientTransformation, seed: int):
  return jax.eval_shape(lambda: init_train_state(model_config, tx, seed))


def create_train_state(
    model_config: ModelConfig, tx: optax.GradientTransformation, seed: int, shardings: Any
) -> TrainState:
  """Initializes the state directly into ``shardings``: no host holds a full copy."""
  return jax.jit(lambda: init_train_state(model_config, tx, seed), out_shardings=shardings)()
