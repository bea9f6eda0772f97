"""Read-ME (Cai et al., NeurIPS 2024): a dense model refactored into a mixture by the
sparsity of its MLP activations, routed by one pre-gating router.

Carving (their ``get_activations.py``, ``generate_mask.py``, ``convert_masked_dense_to_moe``):
the importance of each channel of the input h of every MLP's down projection is its mean
|h| over a domain's tokens; each domain keeps the channels more important than the n-th
most important (n = ``keep`` x width, their ``remain_rate`` 0.5); the shared expert is the
intersection of the domains' masks and domain d's expert the rest of mask d. The carved
experts are real MoE experts, the MLP's weights sliced (and zero-padded to one width,
which adds exactly nothing), so expert d with the shared expert computes the masked
dense MLP ``down((r + m_d) ⊙ act(gate x) ⊙ up x)``.

The importance may instead be Dense2MoE's / LLaMA-MoE's first-order Taylor criterion,
the mean over tokens of |h ∂L/∂h|: the loss change, to first order, of removing the channel.

The router's targets (``train_red.py::loss_func``): per layer and token, the graded
top-N indicator ``f = Σ_{c ∈ {N-1, 4N/5, 3N/5, 2N/5, N/5}} 1[|h| > |h|_(c)] / (3N)`` (N the
width of domain 0's mask, |h|_(c) the c-th largest), overlap scores ``s_d = f · e_d`` with
the domain-specific masks, ``s = 10 (s - mean s)``; the loss is
``0.75 CE(label smoothing 0.5, argmax s) + 0.25 CE(softmax s)``, summed over the layers,
against the one router output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxlab.growth.trees import by_name, rebuild
from jaxlab.nn import ModelConfig, Transformer

CRITERIA = ("activation", "taylor")


def mlp_layers(config: ModelConfig) -> list[int]:
  """The layers whose FFN is a dense MLP."""
  return [i for i in range(config.num_layers) if config.ffn_of(i) == "mlp"]


def _recording(model: Transformer, on: bool) -> list[int]:
  layers = mlp_layers(model.config)
  for i in layers:
    model.blocks[i].ffn.record_down_input = on
  return layers


def down_inputs(model: Transformer, tokens: Int[Array, "b t"]) -> list[Float[Array, "b t f"]]:
  """The input of every MLP's down projection, in layer order (`mlp_layers`)."""
  layers = _recording(model, True)
  try:
    _, sown = nnx.capture(model, nnx.Intermediate)(tokens)
  finally:
    _recording(model, False)
  return [sown["blocks"][i]["ffn"]["down_input"].get_value()[0] for i in layers]


def _token_loss(logits, batch) -> jax.Array:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  return jnp.sum(losses * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def _taylor_terms(model: Transformer, batch) -> list[Float[Array, "b t f"]]:
  """|h ∂L/∂h| per token and channel of every MLP's down-projection input."""
  layers = _recording(model, True)
  try:
    _, perturbations = nnx.capture(model, nnx.Perturbation)(batch["inputs"])

    def loss(model, perturbations):
      logits, sown = nnx.capture(model, nnx.Intermediate, init=perturbations)(batch["inputs"])
      return _token_loss(logits, batch), sown

    grads, sown = nnx.grad(loss, argnums=1, has_aux=True)(model, perturbations)
  finally:
    _recording(model, False)
  return [jnp.abs(sown["blocks"][i]["ffn"]["down_input"].get_value()[0] * grads["blocks"][i]["ffn"]["down_input"][...])
          for i in layers]


def channel_importance(model: Transformer, batches: Iterable[dict], criterion: str = "activation"
                       ) -> Float[Array, "layers f"]:
  """Mean over the batches' tokens of |h| (``activation``, Read-ME) or |h ∂L/∂h|
  (``taylor``, Dense2MoE), per MLP layer and channel of the down projection's input."""
  if criterion not in CRITERIA:
    raise ValueError(f"criterion={criterion!r} is not supported; use one of {CRITERIA}.")
  graphdef, state = nnx.split(model)

  @jax.jit
  def sums(state, batch):
    model = nnx.merge(graphdef, state)
    terms = _taylor_terms(model, batch) if criterion == "taylor" else [jnp.abs(h) for h in
                                                                       down_inputs(model, batch["inputs"])]
    return jnp.stack([jnp.sum(t.astype(jnp.float32), axis=(0, 1)) for t in terms])

  total, tokens = 0.0, 0
  for batch in batches:
    batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "weights")}
    total, tokens = total + sums(state, batch), tokens + batch["inputs"].size
  if not tokens:
    raise ValueError("channel_importance got no batches.")
  return total / tokens


def domain_masks(importance: Float[Array, "domains layers f"], keep: float = 0.5) -> Bool[Array, "domains layers f"]:
  """Each domain's channels more important than its n-th most important, n = keep x width
  (``generate_mask.py``: strictly greater, so n - 1 channels unless there are ties)."""
  if not 0 < keep <= 1:
    raise ValueError(f"keep={keep} must be in (0, 1] (Read-ME keeps 0.5).")
  importance = jnp.asarray(importance)
  n = max(1, round(keep * importance.shape[-1]))
  threshold = jnp.sort(importance, axis=-1)[..., -n]
  return importance > threshold[..., None]


@dataclasses.dataclass(frozen=True)
class Carving:
  """Which channels of each MLP layer every expert keeps."""

  shared: Bool[Array, "layers f"]  # r = the intersection of the domains' masks
  experts: Bool[Array, "layers domains f"]  # e_d = m_d - r
  domain_width: Int[Array, "layers"]  # N = |m_0|, the width of domain 0's mask (router targets)

  @classmethod
  def from_masks(cls, masks: Bool[Array, "domains layers f"]) -> "Carving":
    masks = np.asarray(masks)
    shared = np.all(masks, axis=0)
    return cls(shared=shared, experts=np.swapaxes(masks & ~shared, 0, 1), domain_width=masks[0].sum(-1))


def carved_config(config: ModelConfig, carving: Carving) -> ModelConfig:
  """The Read-ME model: every MLP a pre-gated MoE of one expert per domain plus the
  shared expert, widths the largest over the layers (the rest zero-padded)."""
  experts = int(np.max(np.sum(carving.experts, axis=-1)))
  if experts == 0:
    raise ValueError("every domain's mask equals the shared one: nothing is left for the experts; use more "
                     "distinct domains or a smaller keep.")
  layers = set(mlp_layers(config))
  ffns = tuple("moe" if i in layers else config.ffn_of(i) for i in range(config.num_layers))
  return dataclasses.replace(
      config, ffns=ffns, moe_router="pregate", moe_num_experts=carving.experts.shape[1], moe_top_k=1,
      moe_expert_dim=experts, moe_shared_experts=0, moe_shared_dim=int(np.max(np.sum(carving.shared, -1))),
      moe_shared_gate=False, moe_dispatch="dropless", moe_aux_loss_weight=0.0, moe_z_loss_weight=0.0)


def _channels(mask: np.ndarray, width: int) -> np.ndarray:
  """The kept channels in order, padded with the index one past the last (a zero channel)."""
  kept = np.flatnonzero(mask)
  return np.concatenate([kept, np.full(width - len(kept), len(mask))])


def carve(params: nnx.State, config: ModelConfig, carving: Carving, *, seed: int = 0
          ) -> tuple[nnx.State, ModelConfig]:
  """The dense model's parameters as the Read-ME model's (`carved_config`): attention,
  norms and embeddings copied, every MLP sliced into the shared and domain experts, the
  pre-gating router new (its embedding the first columns of the backbone's, as Read-ME
  initializes it)."""
  if config.mlp_bias:
    raise ValueError("carving slices MLP weights into bias-free experts; model.mlp_bias must be False.")
  if config.moe_pregate_dim > config.d_model:
    raise ValueError(f"the router's embedding is the first model.moe_pregate_dim={config.moe_pregate_dim} columns "
                     f"of the backbone's; pick moe_pregate_dim <= model.d_model={config.d_model}.")
  target = carved_config(config, carving)
  source = by_name(params)
  template = jax.eval_shape(lambda: nnx.split(Transformer(target, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
  router = jax.jit(lambda: by_name(nnx.split(Transformer(target, rngs=nnx.Rngs(params=seed)).pregate,
                                             nnx.Param, ...)[1]))()
  slices = {}
  for row, layer in enumerate(mlp_layers(config)):
    prefix = f"blocks/{layer}/ffn"
    sets = {"shared": _channels(carving.shared[row], target.shared_dim)[None],
            "experts": np.stack([_channels(m, target.expert_dim) for m in carving.experts[row]])}
    for weight in ("gate", "up", "down"):
      if f"{prefix}/{weight}/kernel" not in source:
        continue
      kernel = source[f"{prefix}/{weight}/kernel"]
      if weight == "down":  # [f, d]: rows are channels
        padded = jnp.concatenate([kernel, jnp.zeros((1, kernel.shape[1]), kernel.dtype)])
        picked = {name: padded[idx] for name, idx in sets.items()}  # [sets, width, d]
      else:  # [d, f]: columns are channels
        padded = jnp.concatenate([kernel, jnp.zeros((kernel.shape[0], 1), kernel.dtype)], axis=1)
        picked = {name: jnp.moveaxis(padded[:, idx], 0, 1) for name, idx in sets.items()}  # [sets, d, width]
      slices[f"{prefix}/shared/{weight}/kernel"] = picked["shared"][0]
      slices[f"{prefix}/experts/{weight}"] = picked["experts"]

  def value(name: str, like) -> jax.Array:
    if name.startswith("pregate/"):
      inner = name.removeprefix("pregate/")
      if inner == "embed/table":
        return source["embed/table"][:, :like.shape[1]].astype(like.dtype)
      return router[inner]
    return (slices[name] if name in slices else source[name]).astype(like.dtype)

  return rebuild(template, value), target


def router_targets(activations: list[Float[Array, "b t f"]], carving: Carving) -> Float[Array, "layers b t domains"]:
  """Read-ME's overlap scores ``10 (s - mean s)`` per layer, token and domain expert."""
  scores = []
  for row, h in enumerate(activations):
    a = jnp.abs(h.astype(jnp.float32))
    n = int(carving.domain_width[row])
    descending = -jnp.sort(-a, axis=-1)
    ranks = [n - 1, 4 * n // 5, 3 * n // 5, 2 * n // 5, n // 5]
    graded = sum((a > descending[..., c:c + 1]).astype(jnp.float32) for c in ranks) / (3 * n)
    s = jnp.einsum("btf,ef->bte", graded, jnp.asarray(carving.experts[row], jnp.float32))
    scores.append(10.0 * (s - jnp.mean(s, axis=-1, keepdims=True)))
  return jnp.stack(scores)


def router_loss(logits: Float[Array, "b t e"], scores: Float[Array, "layers b t e"], weights: Float[Array, "b t"]
                ) -> jax.Array:
  """Σ_layers of the token-weighted mean of 0.75 CE(smoothed argmax) + 0.25 CE(softmax s)."""
  e = logits.shape[-1]
  hard = optax.smooth_labels(jax.nn.one_hot(jnp.argmax(scores, axis=-1), e), 0.5)
  per_token = (0.75 * optax.softmax_cross_entropy(logits[None], hard)
               + 0.25 * optax.softmax_cross_entropy(logits[None], jax.nn.softmax(scores, axis=-1)))
  return jnp.sum(jnp.sum(per_token * weights[None], axis=(1, 2)) / jnp.maximum(jnp.sum(weights), 1.0))
