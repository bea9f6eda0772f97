"""Gated linear attention (Yang et al. 2024) as a mixer, after flash-linear-attention's
``GatedLinearAttention`` layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.linear import Linear, broadcast_leading, logical_param
from jaxlab.nn.registry import register_mixer
from jaxlab.nn.ssm import SSMCache, scan_implementation
from jaxlab.sharding import mesh_axes_of, shard
from pallas_kernels.gla.ops import gla


@register_mixer("gla")
class GatedLinearAttention(nnx.Module):
  """q, k, v per head; a data-dependent forget gate per key feature from a low-rank map,
  ``log g = logsigmoid(W₂ W₁ x + b) / normalizer``; the recurrence
  ``S_t = diag(g_t) S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t / sqrt(d_k)``; then per-head
  RMSNorm, a swish output gate and the output projection (fla's defaults: keys half the
  model width, values the full width, gate rank 16, normalizer 16)."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, h = config.d_model, config.gla_num_heads
    dk, dv = config.gla_key_dim // h, config.gla_value_dim // h
    dense = dict(init_std=config.init_std, rngs=rngs)
    self.config = config
    self.q = Linear((d,), (h, dk), ("embed",), ("heads", "head_dim"), **dense)
    self.k = Linear((d,), (h, dk), ("embed",), ("heads", "head_dim"), **dense)
    self.v = Linear((d,), (h, dv), ("embed",), ("heads", "head_dim"), **dense)
    self.gate = Linear((d,), (h, dv), ("embed",), ("heads", "head_dim"), **dense)
    self.forget_down = Linear((d,), (config.gla_gate_rank,), ("embed",), (None,), **dense)
    self.forget_up = Linear((config.gla_gate_rank,), (h, dk), (None,), ("heads", "head_dim"),
                            use_bias=True, **dense)
    self.norm_scale = logical_param(jnp.ones((dv,), jnp.float32), ("head_dim",))
    self.o = Linear((h, dv), (d,), ("heads", "head_dim"), ("embed",), **dense)

  def _mix(self, x: jax.Array, initial_state, implementation):
    c = self.config
    names = ("batch", "length", "heads", "head_dim")
    q, k, v = (shard(proj(x), names) for proj in (self.q, self.k, self.v))
    log_g = jax.nn.log_sigmoid(self.forget_up(self.forget_down(x)).astype(jnp.float32)) / c.gla_gate_normalizer
    o, state = gla(q, k, v, log_g, initial_state=initial_state, return_final_state=True,
                   chunk_size=c.ssm_chunk, implementation=implementation,
                   batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads"))
    o32 = o.astype(jnp.float32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + c.norm_eps)
    o32 = o32 * broadcast_leading(self.norm_scale[...], o32.ndim) * jax.nn.silu(self.gate(x).astype(jnp.float32))
    return self.o(shard(o32.astype(x.dtype), names)), state

  def __call__(self, x: Float[Array, "b t d"], positions: jax.Array) -> Float[Array, "b t d"]:
    del positions
    return self._mix(x, None, scan_implementation(self.config, x.shape[1]))[0]

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    del max_len, dtype
    c = self.config
    h = c.gla_num_heads
    return SSMCache(conv=(), state=jnp.zeros((batch, h, c.gla_key_dim // h, c.gla_value_dim // h), jnp.float32))

  def decode(self, x: Float[Array, "b t d"], positions: jax.Array, cache: SSMCache):
    del positions
    y, state = self._mix(x, cache.state, scan_implementation(self.config, x.shape[1]))
    return y, SSMCache(conv=(), state=state)
