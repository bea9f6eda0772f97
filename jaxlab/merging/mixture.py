"""Mixtures: dense models of one architecture made into one MoE model.

FFN level (Model-GLUE's ``concat-dense-moe-ffn-level``, mergekit-moe): in each MoE
layer, expert ``e`` is source model ``e``'s MLP; everything else (embeddings, mixers,
norms, head) comes from one ``shared`` model (a base, or the cluster merge). Block level
(``mixtral_block_level``): in each mixture layer, expert block ``e`` is source ``e``'s
whole block (mixer, FFN and norms), chosen per sequence (`jaxlab.nn.block_mixture`); any
architecture mixes this way. Model level (``mixtral_model_level``): the same blocks with
one router, at the first mixture layer, for all of them, so top-1 runs one source's
upper layers. The "hybrid" variant keeps the first ``dense_layers`` layers single, from
the shared model (Model-GLUE's ``num_dense_layers``).

Routers: top-k softmax gates renormalized over the chosen experts, dropless, so with
top-1 each token's FFN output (or each sequence's block output) is exactly one source's.
`hidden_router` initializes them as mergekit's ``gate_mode: hidden_avg`` does: router
column ``e`` at layer ``l`` is the unit-normalized mean, over source ``e``'s own data,
of what the router reads there, computed by the shared model: the FFN's normed input
per token at the FFN level (mergekit reads the layer's residual input), the layer's
residual input pooled per sequence at the block and model levels. So a token or
sequence goes to the expert whose data it most resembles. Otherwise the routers keep
the target's random init, to be trained (``optim.trainable`` on ``router``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.growth.trees import abstract_params, by_name, rebuild
from jaxlab.growth.upcycle import initial_routers
from jaxlab import checks
from jaxlab.nn import ModelConfig
from jaxlab.nn.config import BLOCK_POOLERS

Tokens = Int[Array, "b l"]


LEVELS = ("ffn", "block", "model")


def mixture_config(config: ModelConfig, num_experts: int, *, level: str = "ffn", dense_layers: int = 0,
                   top_k: int = 1, pooler: str = "first_token", **fields) -> ModelConfig:
  """The MoE model that mixes ``num_experts`` dense models of ``config``: layers from
  ``dense_layers`` on are ``moe`` with each expert one source's MLP (``level="ffn"``), or
  mixtures of the sources' blocks routed per layer (``"block"``) or once (``"model"``) by
  the sequence's ``pooler`` state; ``fields`` override the target's MoE fields."""
  check_mixable(config, num_experts, dense_layers, top_k, level)
  if level != "ffn":
    return dataclasses.replace(config, block_experts=num_experts, block_dense_layers=dense_layers,
                               block_top_k=top_k, block_router="layer" if level == "block" else "model",
                               block_pooler=pooler, **fields)
  ffns = tuple("mlp" if layer < dense_layers else "moe" for layer in range(config.num_layers))
  moe = dict(moe_num_experts=num_experts, moe_top_k=top_k, moe_expert_dim=None, moe_router="topk",
             moe_gate_order="softmax_topk", moe_renormalize=True, moe_dispatch="dropless",
             moe_shared_experts=0, moe_shared_dim=None)
  return dataclasses.replace(config, ffns=ffns, **{**moe, **fields})


def check_mixable(config: ModelConfig, num_experts: int, dense_layers: int, top_k: int, level: str = "ffn") -> None:
  """Raises ValueError naming what keeps ``num_experts`` models of ``config`` from being mixed."""
  checks.choice("level", level, LEVELS)
  if config.block_experts:
    raise ValueError(f"the sources are block mixtures already (model.block_experts={config.block_experts}); "
                     "mix dense models.")
  if level == "ffn" and set(config.ffns) != {"mlp"}:
    raise ValueError(f"an FFN-level mixture makes each source's MLP an expert; the sources have "
                     f"model.ffns={config.ffns} (every layer must be 'mlp'; level='block' mixes any blocks).")
  if level == "ffn" and config.mlp_bias:
    raise ValueError("the sources' MLPs have biases (model.mlp_bias=True), which experts do not.")
  if num_experts < 2:
    raise ValueError(f"a mixture needs at least two source models; got {num_experts}.")
  if not 0 <= dense_layers < config.num_layers:
    raise ValueError(f"dense_layers={dense_layers}: keep between 0 and {config.num_layers - 1} of the "
                     f"{config.num_layers} layers dense.")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k}: choose between 1 and the {num_experts} experts.")


def hidden_router(graphdef: nnx.GraphDef, shared: nnx.State, model_state: nnx.State,
                  data: Sequence[Iterable[Tokens]], *, level: str = "ffn",
                  pooler: str = "first_token") -> dict[int, Float[Array, "d e"]]:
  """``{layer: router kernel [d_model, experts]}``, column ``e`` the unit-normalized mean
  over ``data[e]`` (batches of source ``e``'s tokens) of what the router reads in the
  shared model: each token's FFN input (``level="ffn"``), or each sequence's residual
  input to the layer, pooled by ``pooler`` (the block and model levels)."""
  checks.choice("level", level, LEVELS)
  checks.choice("pooler", pooler, BLOCK_POOLERS)

  @jax.jit
  def ffn_inputs(params, tokens):
    model = nnx.merge(graphdef, params, model_state)
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
    return {int(path[1]): jnp.sum(leaf.get_value()[0].astype(jnp.float32), axis=(0, 1))
            for path, leaf in nnx.to_flat_state(captured)
            if len(path) == 4 and path[0] == "blocks" and path[2] == "ffn_norm" and path[3] == "__call__"}

  @jax.jit
  def layer_inputs(params, tokens):
    model = nnx.merge(graphdef, params, model_state)
    states = model.hidden_states(*model.embeddings(tokens))[:-1]
    pooled = [x[:, 0] if pooler == "first_token" else jnp.mean(x, axis=1) for x in states]
    return {layer: jnp.sum(p.astype(jnp.float32), axis=0) for layer, p in enumerate(pooled)}

  read, per_batch = (ffn_inputs, lambda tokens: tokens.size) if level == "ffn" else \
      (layer_inputs, lambda tokens: tokens.shape[0])
  columns = []
  for e, batches in enumerate(data):
    sums, count = None, 0
    for tokens in batches:
      out = read(shared, tokens)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      count += per_batch(tokens)
    if sums is None:
      raise ValueError(f"hidden_router got no batches for source {e}.")
    columns.append({layer: s / count for layer, s in sums.items()})
  return {layer: jnp.stack([c[layer] / jnp.maximum(jnp.linalg.norm(c[layer]), 1e-8) for c in columns], axis=1)
          for layer in columns[0]}


def _mixture_router_layer(name: str, target: ModelConfig) -> int | None:
  """The layer of the mixture's router parameter ``name`` (the model-level router: the first
  mixture layer's), or None for every other parameter (the sources' own MoE routers too)."""
  parts = name.split("/")
  if target.block_experts:
    if name == "block_router/kernel":
      return target.block_dense_layers
    return int(parts[1]) if parts[0] == "blocks" and parts[2] == "router" else None
  return int(parts[1]) if parts[0] == "blocks" and parts[2:4] == ["ffn", "router"] else None


def mix(sources: Sequence[nnx.State], config: ModelConfig, target: ModelConfig, *, shared: nnx.State,
        routers: dict[int, jax.Array] | None = None, seed: int = 0) -> nnx.State:
  """The parameters of the mixture ``target`` (`mixture_config`) of the dense ``sources``
  of ``config``: experts from the sources' MLPs (FFN level) or blocks (block and model
  levels), the rest from ``shared``, router kernels from ``routers`` (``{layer: kernel}``;
  missing layers: the target's init for ``seed``)."""
  experts = target.block_experts or target.moe_num_experts
  if experts != len(sources):
    raise ValueError(f"the target mixes {experts} experts, but {len(sources)} sources were given.")
  trees = [by_name(s) for s in sources]
  base = by_name(shared)
  routers = dict(routers or {})
  template = abstract_params(target)
  layers = {name: _mixture_router_layer(name, target) for name in by_name(template)}
  missing = {name for name, layer in layers.items()
             if layer is not None and not (layer in routers and name.endswith("kernel"))}
  initial = initial_routers(target, seed)[0] if missing else {}  # compiled only if needed

  def value(name: str, like: jax.ShapeDtypeStruct) -> jax.Array:
    parts, layer = name.split("/"), layers[name]
    if layer is not None:
      return (initial[name] if name in missing else routers[layer]).astype(like.dtype)
    if target.block_experts and parts[0] == "blocks" and parts[2] == "experts":
      return trees[int(parts[3])]["/".join(["blocks", parts[1], *parts[4:]])].astype(like.dtype)
    if not target.block_experts and parts[0] == "blocks" and parts[2:4] == ["ffn", "experts"]:
      return jnp.stack([t[f"blocks/{parts[1]}/ffn/{parts[4]}/kernel"] for t in trees]).astype(like.dtype)
    return base[name].astype(like.dtype)

  return rebuild(template, value)
