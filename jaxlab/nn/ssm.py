"""State space mixers: Mamba (selective scan) with optional polarization, Mamba-2 (SSD)
and S4D, each with the mixer interface of jaxlab/nn/registry.py (full sequence,
``init_cache``, ``decode``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float

from jaxlab.nn.config import ModelConfig
from jaxlab.nn.conv import CausalConv
from jaxlab.nn.linear import Linear, broadcast_leading, logical_param
from jaxlab.nn.registry import register_mixer
from jaxlab.sharding import mesh_axes_of, shard
from pallas_kernels.selective_scan.ops import selective_scan
from pallas_kernels.ssd.ops import ssd

# Parameters of the dynamics that take no weight decay (mamba_ssm's `_no_weight_decay`,
# S4's optimizer groups); jaxlab/train/optim.py reads this.
NO_WEIGHT_DECAY = ("A_log", "D", "log_A_real", "A_imag", "log_dt")
POLAR_STATES = {None: (0, 0), "both": (1, 1), "one": (1, 0), "zero": (0, 1)}  # (A = 0, A = -inf)


def scan_implementation(config: ModelConfig, length: int) -> str | None:
  """The configured scan implementation; a single decoded token takes one plain
  recurrence step."""
  if length == 1:
    return "sequential"
  return None if config.ssm_impl == "auto" else config.ssm_impl


def inverse_softplus_dt(key: jax.Array, shape: tuple[int, ...], config: ModelConfig) -> jax.Array:
  """Mamba's step-size bias: dt ~ log-uniform[dt_min, dt_max], floored at 1e-4, stored
  as softplus⁻¹(dt) = dt + log(-expm1(-dt)) so that softplus(bias) = dt at init."""
  lo, hi = math.log(config.ssm_dt_min), math.log(config.ssm_dt_max)
  dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), 1e-4)
  return dt + jnp.log(-jnp.expm1(-dt))


@struct.dataclass
class SSMCache:
  """The last ``conv - 1`` inputs of each short convolution and the recurrent state (fp32)."""

  conv: tuple[jax.Array, ...]
  state: jax.Array


@register_mixer("mamba")
class Mamba(nnx.Module):
  """Mamba block (Gu & Dao 2023; mamba_ssm's ``Mamba``): ``x, z = in_proj(u)``,
  ``x = silu(conv(x))``, ``Δ, B, C = x_proj(x)``, ``y = SSM(x) · silu(z)``, ``out_proj(y)``,
  where the SSM is ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t`` with
  S4D-Real ``A = -[1..N]`` per channel and ``Δ = softplus(dt_proj(Δ_low) + dt_bias)``.

  Polarization (Wang et al. 2025, SSM-Bottleneck's ``PolarizedMamba``): every channel
  gets, besides its N learned states, one state with A = 0 (never forgets: the exact
  running sum of Δ B x) and/or one forgetting state with ``A = polarization_zero_A``
  (the official -100, scanned with the others) or A = -inf (forgets at once: only
  Δ_t B_t x_t; it needs no scan and adds ``C_t B_t Δ_t x_t`` to the output), with
  input-dependent B and C like the others, fixed and not learned.
  """

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, e, n, r = config.d_model, config.ssm_inner, config.state_size("mamba"), config.dt_rank
    self.ones, self.zeros = POLAR_STATES[config.polarization]
    self.zero_A = config.polarization_zero_A  # None: A = -inf, outside the scan
    self.config = config
    dense = dict(init_std=config.init_std, rngs=rngs)
    biased = dict(dense, use_bias=config.ssm_bias)
    self.in_proj = Linear((d,), (2, e), ("embed",), (None, "mlp"), **biased)
    self.conv = CausalConv(e, config.ssm_conv, "mlp", rngs=rngs)
    self.x_proj = Linear((e,), (r + 2 * (n + self.ones + self.zeros),), ("mlp",), (None,), **dense)
    bound = r**-0.5
    self.dt_proj = logical_param(jax.random.uniform(rngs.params(), (r, e), jnp.float32, -bound, bound),
                                 (None, "mlp"))
    self.dt_bias = logical_param(inverse_softplus_dt(rngs.params(), (e,), config), ("mlp",))
    a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n)))
    self.A_log = logical_param(a_log, ("mlp", "state"))
    self.D = logical_param(jnp.ones((e,), jnp.float32), ("mlp",))
    self.out_proj = Linear((e,), (d,), ("mlp",), ("embed",), **biased)

  @property
  def scan_states(self) -> int:
    """States that go through the scan: the learned N, the A = 0 state and a finite
    forgetting state."""
    return self.A_log.shape[1] + self.ones + (self.zeros if self.zero_A is not None else 0)

  @property
  def skipped_zero_state(self) -> bool:
    """Whether the A = -inf state is added outside the scan."""
    return bool(self.zeros) and self.zero_A is None

  def A(self) -> Float[Array, "e m"]:
    """The scan's transition: ``[0 (A = 0 state),] -exp(A_log)[, polarization_zero_A]``."""
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))
    if self.ones:
      a = jnp.concatenate([jnp.zeros((a.shape[0], self.ones), jnp.float32), a], axis=1)
    if self.zeros and self.zero_A is not None:
      a = jnp.concatenate([a, jnp.full((a.shape[0], self.zeros), self.zero_A, jnp.float32)], axis=1)
    return a

  def ssm_inputs(self, u: Float[Array, "b t d"], conv_prefix=None):
    """x (after conv and silu), z, Δ before its bias, B and C (every state's, the
    A = -inf one last), and the new conv prefix."""
    xz = self.in_proj(u)
    x, prefix = self.conv(xz[..., 0, :], conv_prefix)
    x = shard(jax.nn.silu(x), ("batch", "length", "mlp"))
    r, m = self.dt_proj.shape[0], self.scan_states + self.skipped_zero_state
    dt_low, B, C = jnp.split(self.x_proj(x), [r, r + m], axis=-1)
    delta = jnp.einsum("btr,re->bte", dt_low, self.dt_proj[...].astype(dt_low.dtype))
    return x, xz[..., 1, :], delta, B, C, prefix

  def ssm(self, x, z, delta, B, C, initial_state, implementation):
    """The selective scan over the learned and fixed states, plus the A = -inf state when
    it is skipped; Δ = softplus(delta + dt_bias) is computed once for both."""
    m = self.scan_states
    dt = jax.nn.softplus(delta.astype(jnp.float32) + self.dt_bias[...][None, None])
    y, state = selective_scan(
        x, dt, self.A(), B[..., :m], C[..., :m], D=self.D[...], z=None if self.skipped_zero_state else z,
        initial_state=initial_state, return_final_state=True, implementation=implementation,
        batch_axes=mesh_axes_of("batch"), channel_axes=mesh_axes_of("mlp"),
    )
    if self.skipped_zero_state:
      current = (B[..., m] * C[..., m]).astype(jnp.float32)[..., None] * dt * x.astype(jnp.float32)
      y = ((y.astype(jnp.float32) + current) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
    return y, state

  def __call__(self, u: Float[Array, "b t d"], positions: jax.Array) -> Float[Array, "b t d"]:
    del positions
    x, z, delta, B, C, _ = self.ssm_inputs(u)
    y, _ = self.ssm(x, z, delta, B, C, None, scan_implementation(self.config, u.shape[1]))
    return self.out_proj(y)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    del max_len
    e = self.config.ssm_inner
    return SSMCache(conv=(jnp.zeros((batch, self.conv.width - 1, e), dtype),),
                    state=jnp.zeros((batch, e, self.scan_states), jnp.float32))

  def decode(self, u: Float[Array, "b t d"], positions: jax.Array, cache: SSMCache):
    del positions
    x, z, delta, B, C, prefix = self.ssm_inputs(u, cache.conv[0])
    y, state = self.ssm(x, z, delta, B, C, cache.state, scan_implementation(self.config, u.shape[1]))
    return self.out_proj(y), SSMCache(conv=(prefix.astype(cache.conv[0].dtype),), state=state)


def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, groups: int, eps: float) -> jax.Array:
  """Mamba-2's ``RMSNormGated(norm_before_gate=False)``: RMS-normalize ``y · silu(z)``
  within each of ``groups`` equal slices of the features, then scale."""
  h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  h = h.reshape(*h.shape[:-1], groups, -1)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return (h.reshape(y.shape) * broadcast_leading(scale.astype(jnp.float32), y.ndim)).astype(y.dtype)


@register_mixer("mamba2")
class Mamba2(nnx.Module):
  """Mamba-2 block (Dao & Gu 2024; mamba_ssm's ``Mamba2``): x, z, B, C and one Δ per head
  from the input; a short convolution and silu on x, B, C; the SSD recurrence
  ``s_t = exp(Δ_t A_h) s_{t-1} + Δ_t x_t B_tᵀ``, ``y_t = s_t C_t + D_h x_t`` with one scalar
  ``A_h = -exp(A_log)``, ``A_log = log U(1, 16)``; gated RMSNorm with z; out_proj."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, e, h, g = config.d_model, config.ssm_inner, config.ssm_heads, config.ssm_groups
    n = config.state_size("mamba2")
    self.config = config
    dense = dict(init_std=config.init_std, rngs=rngs, use_bias=config.ssm_bias)
    self.in_xz = Linear((d,), (2, e), ("embed",), (None, "mlp"), **dense)
    self.in_bc = Linear((d,), (2 * g * n,), ("embed",), (None,), **dense)
    self.in_dt = Linear((d,), (h,), ("embed",), ("heads",), **dense)
    self.conv_x = CausalConv(e, config.ssm_conv, "mlp", rngs=rngs)
    self.conv_bc = CausalConv(2 * g * n, config.ssm_conv, None, rngs=rngs)
    self.dt_bias = logical_param(inverse_softplus_dt(rngs.params(), (h,), config), ("heads",))
    a = jax.random.uniform(rngs.params(), (h,), jnp.float32, 1.0, 16.0)
    self.A_log = logical_param(jnp.log(a), ("heads",))
    self.D = logical_param(jnp.ones((h,), jnp.float32), ("heads",))
    self.norm_scale = logical_param(jnp.ones((e,), jnp.float32), ("mlp",))
    self.out_proj = Linear((e,), (d,), ("mlp",), ("embed",), **dense)

  def _mix(self, u: jax.Array, prefixes, initial_state, implementation):
    c = self.config
    b, t, _ = u.shape
    h, g, n, p = c.ssm_heads, c.ssm_groups, c.state_size("mamba2"), c.ssm_head_dim
    xz = self.in_xz(u)
    x, prefix_x = self.conv_x(xz[..., 0, :], None if prefixes is None else prefixes[0])
    bc, prefix_bc = self.conv_bc(self.in_bc(u), None if prefixes is None else prefixes[1])
    x, bc = jax.nn.silu(x), jax.nn.silu(bc)
    B, C = jnp.split(bc.reshape(b, t, 2, g, n), 2, axis=2)
    dt = jax.nn.softplus(self.in_dt(u).astype(jnp.float32) + self.dt_bias[...][None, None])
    y, state = ssd(
        shard(x.reshape(b, t, h, p), ("batch", "length", "heads", "head_dim")), dt,
        -jnp.exp(self.A_log[...]), B[:, :, 0], C[:, :, 0], chunk_size=c.ssm_chunk, D=self.D[...],
        initial_state=initial_state, return_final_state=True, implementation=implementation,
        batch_axes=mesh_axes_of("batch"), head_axes=mesh_axes_of("heads"),
    )
    y = gated_rms_norm(y.reshape(b, t, -1), xz[..., 1, :], self.norm_scale[...], g, c.norm_eps)
    return self.out_proj(y), (prefix_x, prefix_bc), state

  def __call__(self, u: Float[Array, "b t d"], positions: jax.Array) -> Float[Array, "b t d"]:
    del positions
    return self._mix(u, None, None, scan_implementation(self.config, u.shape[1]))[0]

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    del max_len
    c = self.config
    n, w = c.state_size("mamba2"), c.ssm_conv - 1
    return SSMCache(
        conv=(jnp.zeros((batch, w, c.ssm_inner), dtype), jnp.zeros((batch, w, 2 * c.ssm_groups * n), dtype)),
        state=jnp.zeros((batch, c.ssm_heads, c.ssm_head_dim, n), jnp.float32),
    )

  def decode(self, u: Float[Array, "b t d"], positions: jax.Array, cache: SSMCache):
    del positions
    y, prefixes, state = self._mix(u, cache.conv, cache.state, scan_implementation(self.config, u.shape[1]))
    conv = tuple(p.astype(old.dtype) for p, old in zip(prefixes, cache.conv))
    return y, SSMCache(conv=conv, state=state)


def s4d_A(config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(log(-Re A), Im A) of the N/2 conjugate pairs, per the S4D initializations (Gu et
  al. 2022, state-spaces/s4 ``dplr``): Lin ``-1/2 + iπn``; Inv ``-1/2 + i(N/π)(N/(2n+1) - 1)``;
  Real ``-(n+1)``."""
  big_n = config.state_size("s4d")
  k = jnp.arange(big_n // 2, dtype=jnp.float32)
  shape = (config.d_model, big_n // 2)
  if config.s4d_init == "real":
    return jnp.broadcast_to(jnp.log(k + 1.0), shape), jnp.zeros(shape, jnp.float32)
  imag = math.pi * k if config.s4d_init == "lin" else (big_n / math.pi) * (big_n / (2 * k + 1) - 1)
  return jnp.full(shape, math.log(0.5), jnp.float32), jnp.broadcast_to(imag, shape)


@register_mixer("s4d")
class S4D(nnx.Module):
  """S4D layer (Gu et al. 2022, state-spaces/s4 ``models/s4/s4d.py``): per channel, a
  diagonal complex SSM with ZOH discretization, ``x_t = exp(ΔA) x_{t-1} + (exp(ΔA) - 1)/A · u_t``,
  ``y_t = 2 Re(C x_t) + D u_t``; computed over a sequence as the causal convolution with
  ``K_l = 2 Re Σ_n C_n (exp(ΔA_n) - 1)/A_n · exp(ΔA_n l)`` (FFT) and while decoding as the
  recurrence. Then GELU and a GLU output projection."""

  def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, half = config.d_model, config.state_size("s4d") // 2
    lo, hi = math.log(config.ssm_dt_min), math.log(config.ssm_dt_max)
    self.log_dt = logical_param(jax.random.uniform(rngs.params(), (d,), jnp.float32, lo, hi), ("embed",))
    log_a_real, a_imag = s4d_A(config)
    self.log_A_real = logical_param(log_a_real, ("embed", "state"))
    self.A_imag = logical_param(a_imag, ("embed", "state"))
    self.C = logical_param(jax.random.normal(rngs.params(), (d, half, 2), jnp.float32) * 0.5**0.5,
                           ("embed", "state", None))
    self.D = logical_param(jax.random.normal(rngs.params(), (d,), jnp.float32), ("embed",))
    self.out_proj = Linear((d,), (2, d), ("embed",), (None, "embed"), init_std=config.init_std, rngs=rngs)

  def _discrete(self):
    """exp(ΔA), the ZOH input weights (exp(ΔA) - 1)/A and C, each [d, N/2] complex, and ΔA."""
    a = -jnp.exp(self.log_A_real[...]) + 1j * self.A_imag[...]
    dt_a = jnp.exp(self.log_dt[...])[:, None] * a
    decay = jnp.exp(dt_a)
    return decay, (decay - 1.0) / a, self.C[..., 0] + 1j * self.C[..., 1], dt_a

  def kernel(self, length: int) -> Float[Array, "d l"]:
    """The convolution kernel K [d, length]."""
    _, b_bar, c, dt_a = self._discrete()
    powers = jnp.exp(dt_a[..., None] * jnp.arange(length, dtype=jnp.float32)[None, None])
    return 2.0 * jnp.sum((c * b_bar)[..., None] * powers, axis=1).real

  def _output(self, y: jax.Array, dtype) -> jax.Array:
    gated = self.out_proj(jax.nn.gelu(y, approximate=False).astype(dtype))
    return gated[..., 0, :] * jax.nn.sigmoid(gated[..., 1, :])

  def __call__(self, u: Float[Array, "b t d"], positions: jax.Array) -> Float[Array, "b t d"]:
    del positions
    t = u.shape[1]
    u32 = u.astype(jnp.float32)
    spectrum = jnp.fft.rfft(u32, n=2 * t, axis=1) * jnp.fft.rfft(self.kernel(t).T, n=2 * t, axis=0)[None]
    y = jnp.fft.irfft(spectrum, n=2 * t, axis=1)[:, :t] + u32 * self.D[...][None, None]
    return self._output(y, u.dtype)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    del max_len, dtype
    return SSMCache(conv=(), state=jnp.zeros((batch, *self.log_A_real.shape), jnp.complex64))

  def decode(self, u: Float[Array, "b t d"], positions: jax.Array, cache: SSMCache):
    """The recurrent form, one step per token."""
    del positions
    decay, b_bar, c, _ = self._discrete()

    def step(state, u_t):
      state = decay[None] * state + b_bar[None] * u_t[..., None]
      return state, 2.0 * jnp.sum(c[None] * state, axis=-1).real

    state, y = jax.lax.scan(step, cache.state, u.astype(jnp.float32).transpose(1, 0, 2))
    y = y.transpose(1, 0, 2) + u.astype(jnp.float32) * self.D[...][None, None]
    return self._output(y, u.dtype), SSMCache(conv=(), state=state)
