"""Model-level mixtures: dense models of one architecture made into one MoE model.

FFN-level mixture (Model-GLUE's ``concat-dense-moe-ffn-level``, mergekit-moe): in each
MoE layer, expert ``e`` is source model ``e``'s MLP; everything else (embeddings,
mixers, norms, head) comes from one ``shared`` model (a base, or the cluster merge).
The "hybrid" variant keeps the first ``dense_layers`` layers dense, their FFNs from the
shared model too (Model-GLUE's ``num_dense_layers``).

Routers: top-k softmax gates renormalized over the chosen experts, dropless, so with
top-1 each token's FFN output is exactly one source's MLP output. `hidden_router`
initializes them as mergekit's ``gate_mode: hidden_avg`` does: router column ``e`` at
layer ``l`` is the unit-normalized mean, over the tokens of source ``e``'s own data, of
the hidden state the router reads there (the FFN's normed input, computed by the shared
model; mergekit reads the layer's residual input); so a token goes to the expert whose
data its hidden state most resembles. Otherwise the routers keep the target's random
init, to be trained (``optim.trainable`` on ``ffn/router``).
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
from jaxlab.nn import ModelConfig

Tokens = Int[Array, "b l"]


def mixture_config(config: ModelConfig, num_experts: int, *, dense_layers: int = 0, top_k: int = 1,
                   **moe_fields) -> ModelConfig:
  """The MoE model that mixes ``num_experts`` dense models of ``config``: layers from
  ``dense_layers`` on are ``moe`` with each expert one source's MLP."""
  check_mixable(config, num_experts, dense_layers, top_k)
  ffns = tuple("mlp" if layer < dense_layers else "moe" for layer in range(config.num_layers))
  fields = dict(moe_num_experts=num_experts, moe_top_k=top_k, moe_expert_dim=None, moe_router="topk",
                moe_gate_order="softmax_topk", moe_renormalize=True, moe_dispatch="dropless",
                moe_shared_experts=0, moe_shared_dim=None)
  return dataclasses.replace(config, ffns=ffns, **{**fields, **moe_fields})


def check_mixable(config: ModelConfig, num_experts: int, dense_layers: int, top_k: int) -> None:
  """Raises ValueError naming what keeps ``num_experts`` models of ``config`` from being mixed."""
  if set(config.ffns) != {"mlp"}:
    raise ValueError(f"an FFN-level mixture makes each source's MLP an expert; the sources have "
                     f"model.ffns={config.ffns} (every layer must be 'mlp').")
  if config.mlp_bias:
    raise ValueError("the sources' MLPs have biases (model.mlp_bias=True), which experts do not.")
  if num_experts < 2:
    raise ValueError(f"a mixture needs at least two source models; got {num_experts}.")
  if not 0 <= dense_layers < config.num_layers:
    raise ValueError(f"dense_layers={dense_layers}: keep between 0 and {config.num_layers - 1} of the "
                     f"{config.num_layers} layers dense.")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k}: choose between 1 and the {num_experts} experts.")


def hidden_router(graphdef: nnx.GraphDef, shared: nnx.State, model_state: nnx.State,
                  data: Sequence[Iterable[Tokens]]) -> dict[int, Float[Array, "d e"]]:
  """``{layer: router kernel [d_model, experts]}``, column ``e`` the unit-normalized mean
  FFN input of the shared model over ``data[e]`` (batches of source ``e``'s tokens)."""

  @jax.jit
  def ffn_inputs(params, tokens):
    model = nnx.merge(graphdef, params, model_state)
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
    return {int(path[1]): jnp.sum(leaf.get_value()[0].astype(jnp.float32), axis=(0, 1))
            for path, leaf in nnx.to_flat_state(captured)
            if len(path) == 4 and path[0] == "blocks" and path[2] == "ffn_norm" and path[3] == "__call__"}

  columns = []
  for e, batches in enumerate(data):
    sums, count = None, 0
    for tokens in batches:
      out = ffn_inputs(shared, tokens)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      count += tokens.size
    if sums is None:
      raise ValueError(f"hidden_router got no batches for source {e}.")
    columns.append({layer: s / count for layer, s in sums.items()})
  return {layer: jnp.stack([c[layer] / jnp.maximum(jnp.linalg.norm(c[layer]), 1e-8) for c in columns], axis=1)
          for layer in columns[0]}


def mix(sources: Sequence[nnx.State], config: ModelConfig, target: ModelConfig, *, shared: nnx.State,
        routers: dict[int, jax.Array] | None = None, seed: int = 0) -> nnx.State:
  """The parameters of the mixture ``target`` (`mixture_config`) of the dense ``sources``
  of ``config``: experts from the sources' MLPs, the rest from ``shared``, router kernels
  from ``routers`` (missing layers: the target's init for ``seed``)."""
  if target.moe_num_experts != len(sources):
    raise ValueError(f"the target has model.moe_num_experts={target.moe_num_experts} for {len(sources)} sources.")
  mlps = [by_name(s) for s in sources]
  base = by_name(shared)
  routers = dict(routers or {})
  moe_layers = [layer for layer in range(target.num_layers) if target.ffn_of(layer) == "moe"]
  initial = initial_routers(target, seed)[0] if set(moe_layers) - set(routers) else {}  # compiled only if needed

  def value(name: str, like: jax.ShapeDtypeStruct) -> jax.Array:
    parts = name.split("/")
    if parts[0] == "blocks" and parts[2:4] == ["ffn", "experts"]:
      return jnp.stack([m[f"blocks/{parts[1]}/ffn/{parts[4]}/kernel"] for m in mlps]).astype(like.dtype)
    if parts[0] == "blocks" and parts[2:4] == ["ffn", "router"]:
      layer = int(parts[1])
      if parts[4] == "kernel" and layer in routers:
        return routers[layer].astype(like.dtype)
      return initial[name].astype(like.dtype)
    return base[name].astype(like.dtype)

  return rebuild(abstract_params(target), value)
