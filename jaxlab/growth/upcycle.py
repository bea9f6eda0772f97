"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a dense model's MLPs become MoE
layers whose experts are all copies of the MLP they replace; only the routers are new.

Every other parameter is copied. Layers whose FFN stays ``mlp`` in the target are copied
too, so ``ffns=("mlp", "moe")`` upcycles every other layer as the paper does. Of a train
state, the optimizer moments are carried the same way (each expert starts with its MLP's
moments, a router with zeros) and the optimizer's step counts are kept; the model state
(a router's balancing bias, a dense-to-sparse router's clock) starts fresh.

The upcycled model computes the dense model's function whenever each token's gates sum
to one and no copy is dropped: top-k (or sigmoid) routing with renormalized gates
(``moe_renormalize``, or ``moe_gate_order="topk_softmax"``) and dropless dispatch, since
then ``Σ_i g_i FFN(x) = FFN(x)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.growth.trees import abstract_params, by_name, differing_fields, rebuild
from jaxlab.nn import ModelConfig, Transformer

EXPERT = re.compile(r"blocks/(\d+)/ffn/experts/(gate|up|down)")


def check_upcycle(config: ModelConfig, target: ModelConfig) -> None:
  """Raises ValueError naming what keeps ``config`` from upcycling into ``target``."""
  moe_fields = [f.name for f in dataclasses.fields(target) if f.name.startswith("moe_")]
  differ = differing_fields(config, target, allowed=["ffns", *moe_fields])
  if differ:
    raise ValueError("upcycling changes only the FFNs; these fields differ:\n  " + "\n  ".join(differ))
  for layer in range(target.num_layers):
    dense, sparse = config.ffn_of(layer), target.ffn_of(layer)
    if dense != sparse and (dense, sparse) != ("mlp", "moe"):
      raise ValueError(f"layer {layer}: upcycling turns an 'mlp' into a 'moe' or keeps the FFN; the dense "
                       f"model has {dense!r} where the target has {sparse!r} (model.ffns).")
  if "moe" not in target.ffns:
    return
  if target.expert_dim != config.mlp_dim:
    raise ValueError(f"each expert is a copy of the dense MLP: model.moe_expert_dim={target.moe_expert_dim} "
                     f"must be None or the dense model.mlp_dim={config.mlp_dim}.")
  if config.mlp_bias:
    raise ValueError("the dense MLP has biases (model.mlp_bias=True), which experts do not; upcycle a "
                     "model trained with mlp_bias=False.")
  if target.shared_dim:
    raise ValueError(f"upcycling copies the MLP into the routed experts only; set model.moe_shared_experts=0 "
                     f"and model.moe_shared_dim=None (the shared MLP is {target.shared_dim} wide).")


def initial_routers(target: ModelConfig, seed: int) -> tuple[dict[str, jax.Array], nnx.State]:
  """The target's own initial routers and model state for ``seed`` (the rest of its
  initialization is computed and discarded by XLA)."""

  @jax.jit
  def init():
    _, params, model_state = nnx.split(Transformer(target, rngs=nnx.Rngs(params=seed)), nnx.Param, ...)
    return {n: v for n, v in by_name(params).items() if "router/" in n}, model_state

  return init()


def _upcycle_tree(tree: nnx.State, template: nnx.State, new: dict[str, jax.Array]) -> nnx.State:
  """A parameter-shaped tree (parameters or one optimizer moment) of the dense model as
  the target's: experts copied from their MLP, routers from ``new``, the rest as is."""
  source = by_name(tree)

  def value(name: str, like: jax.ShapeDtypeStruct) -> jax.Array:
    if name in new:
      return new[name].astype(like.dtype)
    expert = EXPERT.fullmatch(name)
    if expert:
      layer, weight = expert.groups()
      return jnp.broadcast_to(source[f"blocks/{layer}/ffn/{weight}/kernel"], like.shape).astype(like.dtype)
    return source[name].astype(like.dtype)

  return rebuild(template, value)


def upcycle(state: Any, config: ModelConfig, target_config: ModelConfig, *, seed: int = 0) -> Any:
  """``state`` (an ``nnx.State`` of the dense model's parameters, or its train state with
  ``params``, ``opt_state`` and ``model_state``) as the state of ``target_config``.
  Routers get the target's initialization for ``seed``. Works under ``jax.jit`` with the
  target's output shardings."""
  check_upcycle(config, target_config)
  template = abstract_params(target_config)
  routers, model_state = initial_routers(target_config, seed)
  if not hasattr(state, "opt_state"):
    return _upcycle_tree(state, template, routers)
  zeros = {name: jnp.zeros_like(value) for name, value in routers.items()}
  structure = jax.tree.structure(state.params)
  is_moment = lambda node: jax.tree.structure(node) == structure  # noqa: E731
  opt_state = jax.tree.map(lambda node: _upcycle_tree(node, template, zeros) if is_moment(node) else node,
                           state.opt_state, is_leaf=is_moment)
  return state.replace(params=_upcycle_tree(state.params, template, routers), opt_state=opt_state,
                       model_state=model_state)
