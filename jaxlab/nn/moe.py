"""The mixture-of-experts feed-forward layer ``moe``: a router scores experts per token,
tokens are dispatched to their experts, and the experts' outputs are combined with the
gate weights (Shazeer et al. 2017; GShard; Switch; Mixtral; DeepSeek-MoE and -V3).

Routers (``model.moe_router``), scores always in fp32:
- ``topk``: softmax over all experts then the top k (``moe_gate_order="softmax_topk"``;
  Switch, OLMoE, Qwen-MoE; renormalized over the k with ``moe_renormalize``, which is
  Mixtral), or the top k logits then a softmax over them (``"topk_softmax"``; equal to
  the renormalized form). At k = 1 a renormalized gate is 1, so the router learns from
  the balancing loss alone; Switch keeps the probability (``moe_renormalize=False``).
- ``sigmoid``: DeepSeek-V3's sigmoid scores; the experts are chosen by score + a
  balancing bias that the train step moves towards equal load (auxiliary-loss-free
  balancing, γ = ``moe_bias_update_rate``), the gates are the scores (renormalized).
- ``expert_choice`` (Zhou et al. 2022): each expert takes its top-C tokens of a
  sequence. It sees the whole sequence, so it cannot decode token by token.
- ``dense_to_sparse``: EvoMoE's Gumbel gate or the activation gate of Nguyen et al. 2024
  (`jaxlab.nn.dense_to_sparse`): every expert weighted by a temperature softmax in
  training until ``moe_dts_switch_step``, then the top k; outside training always the
  top k of the noiseless gate. The router counts its training steps (``GateStep``).

Dispatch (``model.moe_dispatch``) for the token-choice routers:
- ``dropless``: sort the token copies by expert, grouped matmuls (`pallas_kernels.gmm`),
  unsort and combine (MegaBlocks).
- ``capacity``: each expert takes at most C = ceil(capacity_factor · k · t / E) token
  copies per sequence, first choices before second ones (GShard); a dropped copy adds
  nothing, so a token whose copies all drop passes through the residual.
Expert choice uses the same per-sequence capacity C.

Reports (`jaxlab.nn.reports`), per sequence and summed over the batch: the Switch
load-balancing loss ``E Σ_i f_i P_i`` (f_i the fraction of the sequence's token copies
routed to expert i, P_i its mean router probability) and the ST-MoE z-loss
``mean_t logsumexp(logits_t)²``, each times its weight; metrics ``expert_load`` (f),
``dropped_fraction`` and ``router_entropy``; for dense-to-sparse routers also
``temperature`` and ``active_experts`` (experts with a nonzero gate per token).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxlab.nn import dense_to_sparse as dts
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear, broadcast_leading, logical_param
from jaxlab.nn.mlp import MLP
from jaxlab.nn.registry import register_ffn
from jaxlab.nn.reports import Loss, Metric, report, training_rng
from jaxlab.sharding import shard
from jaxlab.sharding.context import mesh_axes_of
from jaxlab.sharding.rules import spec_size
from pallas_kernels.gmm.ops import gmm

class RouterBias(nnx.Variable):
  """DeepSeek-V3's balancing bias: shifts which experts are chosen, never the gates;
  moved by the train step from the measured load, not by the gradient."""


class GateStep(nnx.Variable):
  """The training steps a dense-to-sparse router has taken: the clock of its temperature
  and switch step, advanced by the train step and kept in checkpoints."""


@dataclasses.dataclass(frozen=True)
class Routing:
  """Each token's k experts and gate weights, and the router's probabilities over all
  experts (for the balancing loss)."""

  experts: Int[Array, "b t k"]
  weights: Float[Array, "b t k"]
  probs: Float[Array, "b t e"]


class Router(nnx.Module):
  """Logits ``x W`` (fp32) and the token-choice routing of `moe.py`'s docstring."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    d, e = config.d_model, config.moe_num_experts
    self.kernel = logical_param(jax.random.normal(rngs.params(), (d, e), jnp.float32) * config.init_std,
                                ("embed", None))
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32)) if config.moe_router == "sigmoid" else None
    self.step = GateStep(jnp.zeros((), jnp.int32)) if config.moe_router == "dense_to_sparse" else None
    self.config, self.layer = config, layer

  def logits(self, x: Float[Array, "b t d"]) -> Float[Array, "b t e"]:
    x = x.astype(jnp.float32)
    key = training_rng(self.layer)
    if key is not None and self.config.moe_jitter > 0:  # Switch's multiplicative input jitter
      eps = self.config.moe_jitter
      x = x * jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return x @ self.kernel[...]

  def route(self, logits: Float[Array, "b t e"]) -> Routing:
    c, k = self.config, self.config.moe_top_k
    if c.moe_router == "sigmoid":
      scores = jax.nn.sigmoid(logits)
      _, experts = jax.lax.top_k(scores + broadcast_leading(self.bias[...], scores.ndim), k)
      weights = jnp.take_along_axis(scores, experts, axis=-1)
      probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    elif c.moe_gate_order == "topk_softmax":
      top, experts = jax.lax.top_k(logits, k)
      weights, probs = jax.nn.softmax(top, axis=-1), jax.nn.softmax(logits, axis=-1)
      return Routing(experts, weights, probs)
    else:
      probs = jax.nn.softmax(logits, axis=-1)
      weights, experts = jax.lax.top_k(probs, k)
    if c.moe_renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts, weights, probs)

  def dense_to_sparse(self, logits: Float[Array, "b t e"]) -> tuple[Routing, Float[Array, "b t e"], jax.Array,
                                                                    jax.Array]:
    """The top-k routing of the thresholded gate, the thresholded gate over all experts,
    the temperature, and whether only the top k count (the switch step is reached, or
    this is not training)."""
    c, key = self.config, training_rng(self.layer)
    tau = dts.temperature(c, self.step[...])
    noise = None if key is None else jax.random.fold_in(key, 1)
    gates = dts.thresholded(c, dts.gate_probabilities(c, logits, tau, noise))
    weights, experts = jax.lax.top_k(gates, c.moe_top_k)
    sparse = jnp.asarray(True) if key is None else self.step[...] >= c.moe_dts_switch_step
    return Routing(experts, weights, jax.nn.softmax(logits, axis=-1)), gates, tau, sparse


class Experts(nnx.Module):
  """E feed-forward networks (SwiGLU or GELU, as ``model.mlp_activation``), weights
  ``[expert, embed, mlp]`` and ``[expert, mlp, embed]``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = config.moe_num_experts, config.d_model, config.expert_dim
    normal = lambda shape: jax.random.normal(rngs.params(), shape, jnp.float32) * config.init_std  # noqa: E731
    self.gate = logical_param(normal((e, d, f)), ("expert", "embed", "mlp")) if config.mlp_activation == "swiglu" else None
    self.up = logical_param(normal((e, d, f)), ("expert", "embed", "mlp"))
    self.down = logical_param(normal((e, f, d)), ("expert", "mlp", "embed"))
    self.gmm_impl = None if config.moe_gmm_impl == "auto" else config.moe_gmm_impl  # None: per platform

  def weights(self, dtype) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    cast = lambda w: None if w is None else w[...].astype(dtype)  # noqa: E731
    return cast(self.gate), cast(self.up), cast(self.down)


def _activate(gate_out, up_out):
  if gate_out is None:
    return jax.nn.gelu(up_out, approximate=True)
  return jax.nn.silu(gate_out) * up_out


def grouped_ffn(weights, xs: Float[Array, "m d"], group_sizes: Int[Array, "e"], implementation) -> Float[Array, "m d"]:
  """The experts over token copies sorted by expert (``group_sizes[i]`` rows for expert i)."""
  gate, up, down = weights
  product = lambda a, w: gmm(a, w, group_sizes, implementation=implementation)  # noqa: E731
  h = _activate(None if gate is None else product(xs, gate), product(xs, up))
  return product(h, down)


def batched_ffn(weights, buffers: Float[Array, "e c d"]) -> Float[Array, "e c d"]:
  """The experts over per-expert buffers of equal size."""
  gate, up, down = weights
  product = lambda a, w: jnp.einsum("ecd,edf->ecf", a, w)  # noqa: E731
  h = _activate(None if gate is None else product(buffers, gate), product(buffers, up))
  return product(h, down)


def _local_experts(source, offset, counts) -> jax.Array:
  """The local expert of a received row from its source shard and its offset in that
  source's chunk (chunks are sorted by local expert); ``local`` marks padding."""
  ends = jnp.cumsum(counts, axis=1)[source]  # [rows, local]
  return jnp.sum(offset[:, None] >= ends, axis=-1)


def _run_local(local_ffn, received, source, offset, counts):
  """This shard's experts over what it received, sorted by local expert and back."""
  order = jnp.argsort(_local_experts(source, offset, counts), stable=True)  # padding last
  ys = local_ffn(received[order], jnp.sum(counts, axis=0).astype(jnp.int32))
  return ys[jnp.argsort(order)]


def exchange_padded(
    local_ffn, xs: Float[Array, "m d"], group_sizes: Int[Array, "e"], axes, shards: int,
) -> Float[Array, "m d"]:
  """Expert parallelism for sorted token copies with ``all_to_all``: copies travel to
  the shard holding their expert and back in buffers of m rows per shard (room for
  every copy to go to one shard, so nothing is dropped), the counts per (source shard,
  local expert) alongside; ``local_ffn(rows, sizes)`` runs this shard's experts."""
  m, d = xs.shape
  local = group_sizes.shape[0] // shards
  shard_counts = jnp.sum(group_sizes.reshape(shards, local), axis=1)
  shard_ends = jnp.cumsum(shard_counts)
  shard_starts = shard_ends - shard_counts
  rows = jnp.arange(m)
  source = jnp.minimum(shard_starts[:, None] + rows[None, :], m - 1)
  send = jnp.where((rows[None, :] < shard_counts[:, None])[..., None], xs[source], 0)  # [shards, m, d]
  received = jax.lax.all_to_all(send, axes, 0, 0, tiled=True).reshape(shards * m, d)
  counts = jax.lax.all_to_all(group_sizes.reshape(shards, local), axes, 0, 0, tiled=True)
  block = jnp.arange(shards * m)
  padded = (block % m >= jnp.sum(counts, axis=1)[block // m])  # rows past a source's chunk
  ys = _run_local(local_ffn, received, block // m, jnp.where(padded, m, block % m), counts)
  back = jax.lax.all_to_all(ys.reshape(shards, m, d), axes, 0, 0, tiled=True)
  shard_of = jnp.minimum(jnp.sum(rows[:, None] >= shard_ends[None, :], axis=-1), shards - 1)
  return back[shard_of, rows - shard_starts[shard_of]]


def exchange_ragged(
    local_ffn, xs: Float[Array, "m d"], group_sizes: Int[Array, "e"], axes, shards: int,
    ragged_all_to_all=jax.lax.ragged_all_to_all,
) -> Float[Array, "m d"]:
  """`exchange_padded` with ``ragged_all_to_all``: only the copies travel, each source's
  chunk lands after the chunks of lower-numbered sources, and the results come back
  to the rows they left from."""
  m, d = xs.shape
  local = group_sizes.shape[0] // shards
  shard_counts = jnp.sum(group_sizes.reshape(shards, local), axis=1)  # to each shard
  sent = jax.lax.all_gather(shard_counts, axes)  # [source, destination]
  me = jax.lax.axis_index(axes)
  peers = jnp.arange(shards)
  send_starts = jnp.cumsum(shard_counts) - shard_counts
  recv_sizes = sent[:, me]
  recv_starts = jnp.cumsum(recv_sizes) - recv_sizes
  at_peer = jnp.sum(jnp.where((peers < me)[:, None], sent, 0), axis=0)  # where my chunk lands at each peer
  received = ragged_all_to_all(xs, jnp.zeros((shards * m, d), xs.dtype), send_starts, shard_counts,
                               at_peer, recv_sizes, axis_name=axes)
  counts = jax.lax.all_to_all(group_sizes.reshape(shards, local), axes, 0, 0, tiled=True)
  rows = jnp.arange(shards * m)
  source = jnp.minimum(jnp.sum(rows[:, None] >= jnp.cumsum(recv_sizes)[None, :], axis=-1), shards - 1)
  offset = jnp.where(rows < jnp.sum(recv_sizes), rows - recv_starts[source], m)
  ys = _run_local(local_ffn, received, source, offset, counts)
  back_at = jnp.sum(jnp.where((peers < me)[None, :], sent, 0), axis=1)  # my chunk's start at each source
  return ragged_all_to_all(ys, jnp.zeros((m, d), ys.dtype), recv_starts, recv_sizes, back_at, shard_counts,
                           axis_name=axes)


def exchange_grouped(local_ffn, xs, group_sizes, axes, shards: int):
  """The ragged exchange where the platform has ``ragged_all_to_all`` (TPU, GPU), the
  padded one elsewhere (XLA:CPU lacks it), chosen at lowering."""
  padded = lambda xs, sizes: exchange_padded(local_ffn, xs, sizes, axes, shards)  # noqa: E731
  ragged = lambda xs, sizes: exchange_ragged(local_ffn, xs, sizes, axes, shards)  # noqa: E731
  return jax.lax.platform_dependent(xs, group_sizes, cpu=padded, default=ragged)


class ExpertFFN:
  """The experts as the dispatches call them: ``grouped`` over copies sorted by expert,
  ``batched`` over per-expert buffers ``[E, rows, d]``. With ``expert_axes`` (inside
  `jax.shard_map`) the weights hold this shard's E / shards experts and the copies are
  exchanged with ``all_to_all`` (GShard's expert parallelism)."""

  def __init__(self, weights, implementation, expert_axes=None, shards: int = 1):
    self.weights, self.implementation = weights, implementation
    self.expert_axes, self.shards = expert_axes, shards

  def grouped(self, xs: Float[Array, "m d"], group_sizes: Int[Array, "e"]) -> Float[Array, "m d"]:
    run = lambda rows, sizes: grouped_ffn(self.weights, rows, sizes, self.implementation)  # noqa: E731
    if self.expert_axes is None:
      return run(xs, group_sizes)
    return exchange_grouped(run, xs, group_sizes, self.expert_axes, self.shards)

  def batched(self, buffers: Float[Array, "e c d"]) -> Float[Array, "e c d"]:
    if self.expert_axes is None:
      return batched_ffn(self.weights, buffers)
    local = jax.lax.all_to_all(buffers, self.expert_axes, 0, 1, tiled=True)  # [E / shards, shards · c, d]
    return jax.lax.all_to_all(batched_ffn(self.weights, local), self.expert_axes, 1, 0, tiled=True)


def dropless(
    x: Float[Array, "n d"], experts: Int[Array, "n k"], weights: Float[Array, "n k"], ffn: ExpertFFN,
    num_experts: int,
) -> Float[Array, "n d"]:
  """Every token copy is computed: sort by expert, grouped FFN, unsort, gate and sum."""
  n, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  ys = ffn.grouped(x[order // k], group_sizes)
  y = ys[jnp.argsort(order)].reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def dense_mixture(x: Float[Array, "n d"], gates: Float[Array, "n e"], ffn: ExpertFFN) -> Float[Array, "n d"]:
  """Every expert on every token, weighted by its gate: Σ_e g_e FFN_e(x)."""
  ys = ffn.batched(jnp.broadcast_to(x[None], (gates.shape[-1], *x.shape)))
  return jnp.einsum("end,ne->nd", ys.astype(jnp.float32), gates).astype(x.dtype)


def copies_per_expert(experts: Int[Array, "b t k"], num_experts: int) -> Float[Array, "b t e"]:
  """How many of each token's copies go to each expert."""
  return jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2)


def capacity_of(config: ModelConfig, seq_len: int) -> int:
  """Token copies an expert takes per sequence: ceil(capacity_factor · k · t / E), at most t."""
  c = config
  return min(seq_len, max(1, math.ceil(c.moe_capacity_factor * c.moe_top_k * seq_len / c.moe_num_experts)))


def capacity_positions(experts: Int[Array, "b t k"], num_experts: int) -> Int[Array, "b t k"]:
  """Each copy's position in its expert's queue for its sequence, all first choices
  before any second choice (GShard's priority)."""
  b, t, k = experts.shape
  choice_major = experts.swapaxes(1, 2).reshape(b, k * t)
  onehot = jax.nn.one_hot(choice_major, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
  return position.reshape(b, k, t).swapaxes(1, 2)


def with_capacity(
    x: Float[Array, "b t d"], experts: Int[Array, "b t k"], weights: Float[Array, "b t k"], ffn: ExpertFFN,
    num_experts: int, capacity: int,
) -> tuple[Float[Array, "b t d"], Float[Array, "b"]]:
  """GShard dispatch into [E, C] buffers per sequence; returns the output and each
  sequence's fraction of dropped token copies."""
  b, t, d = x.shape
  position = capacity_positions(experts, num_experts)
  kept = position < capacity
  slot = jnp.where(kept, experts * capacity + position, num_experts * capacity)  # the last slot: dropped
  rows = jnp.arange(b)[:, None, None]
  buffers = jnp.zeros((b, num_experts * capacity + 1, d), x.dtype)
  buffers = buffers.at[rows, slot].set(jnp.broadcast_to(x[:, :, None], (*slot.shape, d)))
  buffers = buffers[:, :-1].reshape(b, num_experts, capacity, d).swapaxes(0, 1).reshape(num_experts, b * capacity, d)
  out = ffn.batched(buffers).reshape(num_experts, b, capacity, d).swapaxes(0, 1)
  out = jnp.concatenate([out.reshape(b, num_experts * capacity, d), jnp.zeros((b, 1, d), out.dtype)], axis=1)
  y = out[rows, slot]
  y = jnp.einsum("btkd,btk->btd", y.astype(jnp.float32), weights * kept).astype(x.dtype)
  return y, 1.0 - jnp.mean(kept.astype(jnp.float32), axis=(1, 2))


def expert_choice(
    x: Float[Array, "b t d"], probs: Float[Array, "b t e"], ffn: ExpertFFN, capacity: int,
) -> Float[Array, "b t d"]:
  """Zhou et al. 2022: expert e takes the C tokens of the sequence with the highest
  probability for it, gate G = that probability; a token sums over the experts that took it."""
  b, t, d = x.shape
  gates, tokens = jax.lax.top_k(probs.swapaxes(1, 2), capacity)  # [b, e, c]
  e = probs.shape[-1]
  rows = jnp.arange(b)[:, None, None]
  buffers = x[rows, tokens].swapaxes(0, 1).reshape(e, b * capacity, d)
  out = ffn.batched(buffers).reshape(e, b, capacity, d).swapaxes(0, 1)
  gated = (out.astype(jnp.float32) * gates[..., None]).reshape(b, e * capacity, d)
  y = jnp.zeros((b, t, d), jnp.float32).at[jnp.arange(b)[:, None], tokens.reshape(b, -1)].add(gated)
  return y.astype(x.dtype)


def _local_tokens(fn, num_outputs: int, x, ffn_weights, implementation, *routing) -> tuple:
  """``fn(x, ffn: ExpertFFN, *routing)`` (a tuple of ``num_outputs`` per-sequence arrays,
  the layer output first) on each device's own sequences under a mesh, since the grouped
  matmul kernels cannot be partitioned automatically: experts split over the mesh axes
  of ``expert`` (expert parallelism), their hidden width over those of ``mlp`` with the
  partial outputs summed (tensor parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(x, ExpertFFN(ffn_weights, implementation), *routing)
  P = jax.sharding.PartitionSpec
  batch, expert, mlp = mesh_axes_of("batch"), mesh_axes_of("expert"), mesh_axes_of("mlp")
  if x.shape[0] % spec_size(P(batch), dict(mesh.shape))[0]:
    batch = None  # too few sequences to split (decoding a few prompts): every device takes all
  shards = spec_size(P(expert), dict(mesh.shape))[0]
  gate, up, down = ffn_weights
  hidden = P(expert, None, mlp)
  weight_specs = (None if gate is None else hidden, hidden, P(expert, mlp, None))

  def local(x, ffn_weights, *routing):
    ffn = ExpertFFN(ffn_weights, implementation, expert if shards > 1 else None, shards)
    y, *rest = fn(x, ffn, *routing)
    return (y if mlp is None else jax.lax.psum(y, mlp), *rest)

  return jax.shard_map(local, in_specs=(P(batch), weight_specs, *(P(batch) for _ in routing)),
                       out_specs=tuple(P(batch) for _ in range(num_outputs)), check_vma=False)(
                           x, ffn_weights, *routing)


@register_ffn("moe")
class MoE(nnx.Module):
  """Routed experts, plus shared experts every token uses (``shared_dim`` wide; DeepSeek-MoE;
  with ``moe_shared_gate`` a sigmoid gate on their output, Qwen-MoE)."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    self.config = config
    self.router = None if config.moe_router == "pregate" else Router(config, layer=layer, rngs=rngs)
    self.experts = Experts(config, rngs=rngs)
    shared = config.shared_dim
    self.shared = MLP(dataclasses.replace(config, mlp_dim=shared), layer=layer, rngs=rngs) if shared else None
    self.shared_gate = (Linear((config.d_model,), (1,), ("embed",), (None,), init_std=config.init_std, rngs=rngs)
                        if shared and config.moe_shared_gate else None)

  def __call__(self, x: Float[Array, "b t d"], experts: Int[Array, "b t"] | None = None) -> Float[Array, "b t d"]:
    """``experts``: each token's expert, from Read-ME's pre-gating router (``pregate`` only)."""
    c = self.config
    b, t, d = x.shape
    ffn_weights, impl = self.experts.weights(x.dtype), self.experts.gmm_impl
    logits = None if self.router is None else self.router.logits(x)
    if c.moe_router == "pregate":
      y = self._pregated(x, experts, ffn_weights, impl)
    elif c.moe_router == "expert_choice":
      probs = jax.nn.softmax(logits, axis=-1)
      (y,) = _local_tokens(lambda x, ffn, p: (expert_choice(x, p, ffn, capacity_of(c, t)),), 1,
                           x, ffn_weights, impl, probs)
      self._report_router(logits, probs, None, None)
    elif c.moe_router == "dense_to_sparse":
      routing, gates, tau, sparse = self.router.dense_to_sparse(logits)

      def fn(x, ffn, experts, weights, gates, sparse):
        flat = lambda a: a.reshape(x.shape[0] * x.shape[1], -1)  # noqa: E731
        top_k = lambda: dropless(flat(x), flat(experts), flat(weights), ffn, c.moe_num_experts)  # noqa: E731
        return (jax.lax.cond(sparse[0], top_k, lambda: dense_mixture(flat(x), flat(gates), ffn)).reshape(x.shape),)

      (y,) = _local_tokens(fn, 1, x, ffn_weights, impl, routing.experts, routing.weights, gates,
                           jnp.broadcast_to(sparse, (b,)))
      chosen = copies_per_expert(routing.experts, c.moe_num_experts) * (gates > 0)
      self._report_router(logits, routing.probs, jnp.where(sparse, chosen, (gates > 0).astype(jnp.float32)),
                          jnp.zeros((b,), jnp.float32))
      report(self, Metric, "temperature", b * tau)
    else:
      routing = self.router.route(logits)
      if c.moe_dispatch == "dropless":
        def fn(x, ffn, experts, weights):
          n = x.shape[0] * x.shape[1]
          y = dropless(x.reshape(n, d), experts.reshape(n, -1), weights.reshape(n, -1), ffn, c.moe_num_experts)
          return (y.reshape(x.shape),)
        (y,) = _local_tokens(fn, 1, x, ffn_weights, impl, routing.experts, routing.weights)
        dropped = jnp.zeros((b,), jnp.float32)
      else:
        fn = lambda x, ffn, e, g: with_capacity(x, e, g, ffn, c.moe_num_experts, capacity_of(c, t))  # noqa: E731
        y, dropped = _local_tokens(fn, 2, x, ffn_weights, impl, routing.experts, routing.weights)
      self._report_router(logits, routing.probs, copies_per_expert(routing.experts, c.moe_num_experts), dropped)
    y = shard(y, ("batch", "length", "embed"))
    if self.shared is not None:
      shared = self.shared(x)
      if self.shared_gate is not None:
        shared = shared * jax.nn.sigmoid(self.shared_gate(x).astype(jnp.float32)).astype(shared.dtype)
      y = y + shared
    return y

  def _pregated(self, x: Float[Array, "b t d"], experts, ffn_weights, impl) -> Float[Array, "b t d"]:
    """Read-ME: every token through its one expert, with gate 1 (with the shared expert
    the caller adds, the masked dense MLP ``down((r + m_c) ⊙ act(gate x) ⊙ up x)`` once carved)."""
    if experts is None:
      raise ValueError("model.moe_router='pregate' takes each token's expert from the model's pre-gating "
                       "router; call the Transformer (or pass experts=[b, t] ids), not the MoE layer alone.")
    b, t, d = x.shape
    c = self.config

    def fn(x, ffn, experts):
      n = x.shape[0] * x.shape[1]
      ones = jnp.ones((n, 1), jnp.float32)
      return (dropless(x.reshape(n, d), experts.reshape(n, 1), ones, ffn, c.moe_num_experts).reshape(x.shape),)

    (y,) = _local_tokens(fn, 1, x, ffn_weights, impl, experts[..., None])
    load = jnp.mean(copies_per_expert(experts[..., None], c.moe_num_experts), axis=1)
    report(self, Metric, "expert_load", jnp.sum(load, axis=0))
    return y

  def _report_router(self, logits, probs, copies: Float[Array, "b t e"] | None, dropped) -> None:
    """Per-sequence losses and metrics, summed over the batch (`jaxlab.nn.reports`);
    ``copies`` counts each token's copies per expert (None for expert choice)."""
    c, e = self.config, self.config.moe_num_experts
    if copies is not None:
      load = jnp.sum(copies, axis=1) / jnp.maximum(jnp.sum(copies, axis=(1, 2))[:, None], 1.0)  # [b, e]: f_i
      report(self, Metric, "expert_load", jnp.sum(load, axis=0))
      if c.moe_router == "dense_to_sparse":
        report(self, Metric, "active_experts", jnp.sum(jnp.mean(jnp.sum(copies, axis=-1), axis=1)))
      report(self, Metric, "dropped_fraction", jnp.sum(dropped))
      aux = e * jnp.sum(load * jnp.mean(probs, axis=1), axis=-1)
      report(self, Metric, "aux_loss", jnp.sum(aux))
      if c.moe_aux_loss_weight:
        report(self, Loss, "weighted_aux_loss", c.moe_aux_loss_weight * jnp.sum(aux))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2, axis=1)
    report(self, Metric, "z_loss", jnp.sum(z))
    if c.moe_z_loss_weight:
      report(self, Loss, "weighted_z_loss", c.moe_z_loss_weight * jnp.sum(z))
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)
    report(self, Metric, "router_entropy", jnp.sum(jnp.mean(entropy, axis=1)))

  def update_state(self, metrics: dict[str, jax.Array]) -> None:
    """Once per train step: a dense-to-sparse router's clock advances; DeepSeek-V3's bias
    moves b_i += γ · sign(mean load - load_i), from the batch's expert load."""
    if self.router is None:
      return
    if self.router.step is not None:
      self.router.step[...] += 1
    if self.router.bias is not None and self.config.moe_bias_update_rate and "expert_load" in metrics:
      load = metrics["expert_load"]
      self.router.bias[...] += self.config.moe_bias_update_rate * jnp.sign(jnp.mean(load) - load)
