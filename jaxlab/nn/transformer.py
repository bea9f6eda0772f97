"""Decoder-only LM: embedding, blocks ``x + mixer(norm(x))``, ``x + ffn(norm(x))``, head."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from jaxlab.nn.abacus import AbacusPositions
from jaxlab.nn.block import REMAT_POLICIES, apply_block
from jaxlab.nn.block_mixture import BlockMixture, SequenceRouter, make_block
from jaxlab.nn.config import ModelConfig
from jaxlab.nn.embed import Embed
from jaxlab.nn.linear import Linear
from jaxlab.nn.lora import add_lora
from jaxlab.nn.norms import make_norm
from jaxlab.nn.positional import LearnedPositions
from jaxlab.nn.pregate import PreGatingRouter, choose
from jaxlab.nn.tape import PositionState, initial_position_state
from jaxlab.sharding import shard

@struct.dataclass
class Cache:
  """Decoding state: how many positions are filled, each layer's mixer cache, and the
  pre-gating router's cache (Read-ME; None without one)."""

  index: jax.Array
  layers: list[Any]
  router: Any = None
  digit_run: jax.Array | None = None  # Abacus: the digits ending at the last cached position [b]


class Transformer(nnx.Module):
  """``model(tokens [b, t]) -> logits [b, t, vocab]``. With ``mixers=("attention",)``,
  ``norm="rmsnorm"``, ``mlp_activation="swiglu"`` and RoPE this is the Llama architecture.
  With ``moe_router="pregate"`` a pre-gating router (`jaxlab.nn.pregate`) picks every MoE
  layer's expert from the token ids, unless the caller passes ``experts`` [b, t]. With
  ``block_experts`` the later layers are mixtures of whole blocks (`jaxlab.nn.block_mixture`),
  at the model level routed by ``block_router`` at the first of them. With ``lora_rank`` the
  dense layers matching ``lora_targets`` carry LoRA adapters (`jaxlab.nn.lora`); with ``abacus``
  digit tokens get Abacus embeddings (`jaxlab.nn.abacus`) whatever ``positional`` is."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config.vocab_size, config.d_model, init_std=config.init_std, rngs=rngs)
    self.positions = (
        LearnedPositions(config.max_position, config.d_model, init_std=config.init_std, rngs=rngs)
        if config.positional == "learned" else None
    )
    self.abacus = AbacusPositions(config, rngs=rngs) if config.abacus else None
    self.blocks = nnx.List([make_block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.pregate = PreGatingRouter(config, rngs=rngs) if config.pregated else None
    self.block_router = (SequenceRouter(config, rngs=rngs)
                         if config.block_experts and config.block_router == "model" else None)
    self.final_norm = make_norm(config)
    self.lm_head = (
        None
        if config.tie_embeddings
        else Linear(
            (config.d_model,), (config.vocab_size,), ("embed",), ("vocab",),
            init_std=config.init_std, rngs=rngs,
        )
    )
    if config.lora_rank:
      add_lora(self, config, rngs=rngs)

  def _inputs(self, tokens: jax.Array, positions: jax.Array, digit_run: jax.Array | None = None):
    """Token (+ learned position, + Abacus) embeddings, TAPE's initial position features,
    and the digit run at the last position (None without Abacus)."""
    x = self.embed(tokens)
    if self.positions is not None:
      x = x + self.positions(positions).astype(x.dtype)
    if self.abacus is not None:
      digits, digit_run = self.abacus(tokens, digit_run)
      x = x + digits.astype(x.dtype)
    pe = initial_position_state(positions, self.config) if self.config.positional == "tape" else None
    return shard(x, ("batch", "length", "embed")), pe, digit_run

  def _logits(self, x: Float[Array, "b t d"]) -> Float[Array, "b t vocab"]:
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return shard(logits, ("batch", "length", "vocab"))

  def embeddings(
      self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"] | None = None
  ) -> tuple[Float[Array, "b t d"], Int[Array, "b t"], PositionState | None]:
    """The blocks' input: embeddings, positions (default 0..t-1) and TAPE's features."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, pe, _ = self._inputs(tokens, positions)
    return x, positions, pe

  def hidden_states(
      self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], pe: PositionState | None = None,
      experts: Int[Array, "b t"] | None = None,
  ) -> list[Float[Array, "b t d"]]:
    """The residual stream before the first block and after each block."""
    apply = apply_block
    if self.config.remat != "none":
      apply = nnx.remat(apply_block, policy=REMAT_POLICIES[self.config.remat])
    states, routes = [x], None
    for block in self.blocks:
      if self.block_router is not None and routes is None and isinstance(block, BlockMixture):
        routes = self.block_router(x, positions)
      x, pe = apply(block, x, positions, pe, experts, routes)
      states.append(x)
    return states

  def __call__(
      self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"] | None = None,
      experts: Int[Array, "b t"] | None = None,
  ) -> Float[Array, "b t vocab"]:
    x, positions, pe = self.embeddings(tokens, positions)
    if self.pregate is not None and experts is None:
      experts = choose(self.pregate(tokens, positions))
    return self._logits(self.hidden_states(x, positions, pe, experts)[-1])

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    if "moe" in self.config.ffns and self.config.moe_router == "expert_choice":
      raise ValueError("model.moe_router='expert_choice' picks each expert's tokens from the whole "
                       "sequence, so it cannot decode one token at a time; use moe_router='topk' "
                       "for models that generate.")
    if self.config.block_experts and self.config.block_pooler == "mean":
      raise ValueError("model.block_pooler='mean' routes each sequence by its mean over all positions, so it "
                       "cannot decode one token at a time; use block_pooler='first_token' for models that "
                       "generate.")
    layers = [block.init_cache(batch, max_len, dtype) for block in self.blocks]
    router = None if self.pregate is None else self.pregate.init_cache(batch, max_len, dtype)
    digit_run = None if self.abacus is None else jnp.zeros((batch,), jnp.int32)
    return Cache(index=jnp.zeros((), jnp.int32), layers=layers, router=router, digit_run=digit_run)

  def decode(self, tokens: Int[Array, "b t"], cache: Cache) -> tuple[Float[Array, "b t vocab"], Cache]:
    """Logits for the next t tokens given the cache of everything before them."""
    b, t = tokens.shape
    positions = cache.index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, pe, digit_run = self._inputs(tokens, positions, cache.digit_run)
    experts, router = None, None
    if self.pregate is not None:
      logits, router = self.pregate.decode(tokens, positions, cache.router)
      experts = choose(logits)
    layers, routes = [], None
    for block, layer_cache in zip(self.blocks, cache.layers):
      if self.block_router is not None and routes is None and isinstance(block, BlockMixture):
        routes = self.block_router(x, positions, layer_cache.routes)
      if routes is None:
        x, layer_cache, pe = block.decode(x, positions, layer_cache, pe, experts)
      else:
        x, layer_cache, pe = block.decode(x, positions, layer_cache, routes=routes)
      layers.append(layer_cache)
    return self._logits(x), Cache(index=cache.index + t, layers=layers, router=router, digit_run=digit_run)


def parameter_count(config: ModelConfig) -> int:
  """The number of parameters of a model of ``config``, from its shapes alone."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def convert_positional(model: Transformer, positional: str, *, rngs: nnx.Rngs) -> Transformer:
  """The same model with another positional encoding: every parameter the two share
  is copied, new ones (e.g. TAPE's, zero-initialized so TAPE starts as RoPE) keep their
  initialization. Used to fine-tune a pretrained RoPE model into TAPE."""
  config = dataclasses.replace(model.config, positional=positional)
  new = Transformer(config, rngs=rngs)
  old_params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  new_params = nnx.state(new, nnx.Param)
  for path, variable in nnx.to_flat_state(new_params):
    if path in old_params:
      variable.set_value(old_params[path][...])
  nnx.update(new, new_params)
  return new


def sample_token(
    logits: Float[Array, "b vocab"], rng: jax.Array, temperature: jax.Array, top_k: int | None
) -> Int[Array, "b"]:
  """Greedy when ``temperature == 0``; otherwise samples softmax(logits / T), optionally
  restricted to the ``top_k`` most likely tokens."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k"))
def _generate(graphdef, state, prompt, rng, temperature, *, max_new_tokens, top_k):
  model = nnx.merge(graphdef, state)
  b, t = prompt.shape
  caches = model.init_cache(b, t + max_new_tokens, model.embed.table.dtype)
  logits, caches = model.decode(prompt, caches)
  first = sample_token(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)

  def step(carry, i):
    token, caches = carry
    logits, caches = model.decode(token[:, None], caches)
    nxt = sample_token(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k)
    return (nxt, caches), token

  (last, _), tokens = jax.lax.scan(step, (first, caches), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(
    model: Transformer,
    prompt_tokens: Int[Array, "b t"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> Int[Array, "b n"]:
  """Continues every prompt by ``max_new_tokens`` tokens using the mixers' caches.

  The prompt is prefilled in one call; then one token per step in a ``lax.scan``.
  Returns only the new tokens, ``[b, max_new_tokens]``.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy).")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(
      graphdef, state, jnp.asarray(prompt_tokens, jnp.int32), rng,
      jnp.asarray(temperature, jnp.float32), max_new_tokens=max_new_tokens, top_k=top_k,
  )
