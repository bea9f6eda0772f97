"""State space and linear-attention mixers inside the LM: decode equals the full
forward, Mamba's defaults, S4D's two forms, polarization, hybrids, config errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer, generate
from jaxlab.nn.ssm import Mamba
from jaxlab.train.step import forward, weighted_cross_entropy
from pallas_kernels.selective_scan.reference import selective_scan_reference

BASE = dict(vocab_size=53, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, ssm_chunk=16)
MIXERS = {
    "mamba": dict(mixers=("mamba",)),
    "mamba_polarized": dict(mixers=("mamba",), polarization="both", ffns=("none",)),
    "mamba_one": dict(mixers=("mamba",), polarization="one"),
    "mamba_zero": dict(mixers=("mamba",), polarization="zero"),
    "mamba2": dict(mixers=("mamba2",), ssm_head_dim=16, ssm_state=8, ssm_groups=2),
    "s4d_lin": dict(mixers=("s4d",), ssm_state=8),
    "s4d_inv": dict(mixers=("s4d",), ssm_state=8, s4d_init="inv"),
    "s4d_real": dict(mixers=("s4d",), ssm_state=8, s4d_init="real"),
    "gla": dict(mixers=("gla",), gla_heads=2),
    "hybrid": dict(mixers=("mamba", "mamba", "attention"), num_layers=3, num_kv_heads=2),
}


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 53, jnp.int32)


def randomized(model, seed=0, scale=0.1):
  """Every parameter perturbed, away from the special initializations."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                                 for k, x in zip(keys, leaves)]))
  return model


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decode_equals_forward(name):
  """Prefill 7 tokens (the recurrent state and the conv prefix carried), then one at a time."""
  model = randomized(Transformer(ModelConfig(**{**BASE, **MIXERS[name]}), rngs=nnx.Rngs(1)))
  t = tokens(2, (2, 13))
  full = nnx.jit(lambda m, x: m(x))(model, t)
  decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))
  logits, cache = decode(model, t[:, :7], model.init_cache(2, 16))
  steps = [logits]
  for i in range(7, 13):
    logits, cache = decode(model, t[:, i : i + 1], cache)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=2e-4, rtol=2e-4)


def test_greedy_generation_with_recurrent_mixers_is_argmax_of_forward():
  """generate() carries the recurrent caches (conv prefix, real and complex states)
  through its lax.scan."""
  config = ModelConfig(**{**BASE, "mixers": ("mamba", "s4d"), "ssm_state": 8})
  model = randomized(Transformer(config, rngs=nnx.Rngs(4)))
  prompt = tokens(8, (2, 5))
  new = generate(model, prompt, 8, temperature=0.0)
  logits = model(jnp.concatenate([prompt, new], axis=1))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 4:-1], -1)), np.asarray(new))


@pytest.mark.parametrize("impl", ["sequential", "associative", "xla", "pallas_interpret"])
def test_mamba_implementations_agree(impl):
  config = ModelConfig(**{**BASE, **MIXERS["mamba_polarized"]})
  model = randomized(Transformer(config, rngs=nnx.Rngs(3)))
  t = tokens(4, (2, 19))
  want = model(t)
  model_impl = Transformer(ModelConfig(**{**config.to_dict(), "ssm_impl": impl}), rngs=nnx.Rngs(0))
  nnx.update(model_impl, nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(model_impl(t), want, atol=2e-4, rtol=2e-4)


def test_mamba_defaults_follow_mamba_ssm():
  config = ModelConfig(**{**BASE, "d_model": 48, "mixers": ("mamba",)})
  mixer = Mamba(config, layer=0, rngs=nnx.Rngs(0))
  assert config.ssm_inner == 96 and config.dt_rank == math.ceil(48 / 16) and mixer.conv.width == 4
  chex.assert_trees_all_close(mixer.A()[0], -jnp.arange(1.0, 17.0))  # S4D-Real
  dt = jax.nn.softplus(mixer.dt_bias[...])
  assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 0.1 * (1 + 1e-5)
  assert float(jnp.std(jnp.log(dt))) > 0.5  # spread over the log-uniform range
  assert mixer.dt_proj.shape == (3, 96) and float(jnp.abs(mixer.dt_proj[...]).max()) <= 3**-0.5


def _polarized(polarization, seed=5, zero_A=-100.0):
  config = ModelConfig(**{**BASE, **MIXERS["mamba"], "polarization": polarization,
                          "polarization_zero_A": zero_A})
  mixer = randomized(Mamba(config, layer=0, rngs=nnx.Rngs(seed)), seed)
  u = jax.random.normal(jax.random.key(seed), (2, 11, 32))
  return mixer, mixer.ssm_inputs(u)[:5]


def test_polarized_one_state_is_the_exact_prefix_sum():
  """The A = 0 state after t steps is Σ_{s≤t} Δ_s B_s x_s (Wang et al. 2025, §5)."""
  mixer, (x, z, delta, B, C) = _polarized("both")
  dt = jax.nn.softplus(delta + mixer.dt_bias[...][None, None])
  for t in (1, 6, 11):
    _, state = mixer.ssm(x[:, :t], z[:, :t], delta[:, :t], B[:, :t], C[:, :t], None, "sequential")
    prefix_sum = jnp.sum(dt[:, :t] * x[:, :t] * B[:, :t, :1], axis=1)
    chex.assert_trees_all_close(state[..., 0], prefix_sum, atol=1e-5, rtol=1e-5)


def test_polarized_zero_state_holds_only_the_current_input():
  """With the A = -inf state written out explicitly, the reference scan's last state
  column is Δ_t B_t x_t after every t, and the mixer (which skips that scan) agrees."""
  mixer, (x, z, delta, B, C) = _polarized("both", zero_A=None)
  a = jnp.concatenate([mixer.A(), jnp.full((x.shape[-1], 1), -jnp.inf)], axis=1)
  dt = jax.nn.softplus(delta + mixer.dt_bias[...][None, None])
  for t in (1, 4, 11):
    y_ref, state = selective_scan_reference(
        x[:, :t], delta[:, :t], a, B[:, :t], C[:, :t], D=mixer.D[...], z=z[:, :t],
        delta_bias=mixer.dt_bias[...], delta_softplus=True, return_final_state=True)
    chex.assert_trees_all_close(state[..., -1], dt[:, t - 1] * x[:, t - 1] * B[:, t - 1, -1:], atol=1e-6)
    y, _ = mixer.ssm(x[:, :t], z[:, :t], delta[:, :t], B[:, :t], C[:, :t], None, "sequential")
    chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_polarized_zero_state_at_the_official_A_forgets_by_exp_of_minus_100_dt():
  """The official forgetting state (A = -100, SSM-Bottleneck's ``value_zeros``) is a
  scanned state with Ā_t = exp(-100 Δ_t): h_t = Ā_t h_{t-1} + Δ_t B_t x_t, against the
  recurrence written out here, and the mixer's output equals the reference scan over
  all the states."""
  mixer, (x, z, delta, B, C) = _polarized("both")
  assert mixer.scan_states == 18 and float(mixer.A()[0, -1]) == -100.0
  dt = jax.nn.softplus(delta + mixer.dt_bias[...][None, None])
  h = jnp.zeros_like(x[:, 0])
  for t in range(x.shape[1]):
    h = jnp.exp(-100.0 * dt[:, t]) * h + dt[:, t] * x[:, t] * B[:, t, -1:]
  y, state = mixer.ssm(x, z, delta, B, C, None, "sequential")
  chex.assert_trees_all_close(state[..., -1], h, atol=1e-6, rtol=1e-5)
  y_ref = selective_scan_reference(x, delta, mixer.A(), B, C, D=mixer.D[...], z=z, delta_bias=mixer.dt_bias[...],
                                   delta_softplus=True)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("polarization,zero_A,states", [
    (None, -100.0, 16), ("both", -100.0, 18), ("both", None, 17), ("one", -100.0, 17), ("zero", -100.0, 17),
    ("zero", None, 16)])
def test_polarized_states_are_fixed_not_learned(polarization, zero_A, states):
  mixer, _ = _polarized(polarization, zero_A=zero_A)
  assert mixer.A_log.shape == (64, 16)  # only the N learned states are parameters
  assert mixer.scan_states == states
  extra = (polarization in ("both", "one")) + (polarization in ("both", "zero"))
  assert mixer.x_proj.kernel.shape == (64, 2 + 2 * (16 + extra))
  if polarization in ("both", "one"):
    grads = nnx.grad(lambda m: jnp.sum(m.A()))(mixer)
    chex.assert_trees_all_close(grads.A_log[...], -jnp.exp(mixer.A_log[...]))  # the 0 column adds nothing


def test_s4d_convolution_kernel_is_the_impulse_response():
  """The FFT convolution with K is the recurrence: K_l = y_l for an impulse at 0."""
  model = Transformer(ModelConfig(**{**BASE, **MIXERS["s4d_inv"]}), rngs=nnx.Rngs(0))
  mixer = model.blocks[0].mixer
  impulse = jnp.zeros((1, 9, 32)).at[0, 0].set(1.0)
  decay, b_bar, c, _ = mixer._discrete()
  state, response = jnp.zeros_like(decay), []
  for i in range(9):
    state = decay * state + b_bar * impulse[0, i][:, None]
    response.append(2.0 * jnp.sum(c * state, axis=-1).real)
  chex.assert_trees_all_close(mixer.kernel(9), jnp.stack(response, axis=1), atol=1e-5)


def test_mamba2_groups_and_heads():
  config = ModelConfig(**{**BASE, **MIXERS["mamba2"]})
  assert config.ssm_heads == 4
  cache = Transformer(config, rngs=nnx.Rngs(0)).init_cache(3, 10)
  assert cache.layers[0].state.shape == (3, 4, 16, 8)


@pytest.mark.parametrize("name", ["mamba_polarized", "mamba2", "gla", "hybrid"])
def test_bf16_compute_gives_gradients_close_to_fp32(name):
  """bf16 compute (fp32 master weights) against fp32 compute: the loss within 2% and
  every parameter's gradient within 8% in norm (measured: at most 3.4%)."""
  model = Transformer(ModelConfig(**{**BASE, **MIXERS[name]}), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  t = tokens(7, (2, 17))
  batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": jnp.ones((2, 16))}

  def loss(params, dtype):
    return weighted_cross_entropy(forward(graphdef, params, rest, batch, dtype, None)[0], batch)[0] / 32

  loss16, grads16 = jax.value_and_grad(loss)(params, jnp.bfloat16)
  loss32, grads32 = jax.value_and_grad(loss)(params, jnp.float32)
  assert abs(float(loss16) - float(loss32)) < 2e-2 * abs(float(loss32))
  for (path, g16), g32 in zip(jax.tree_util.tree_leaves_with_path(grads16), jax.tree.leaves(grads32)):
    g16, g32 = np.asarray(g16, np.float32), np.asarray(g32, np.float32)
    assert np.all(np.isfinite(g16)), jax.tree_util.keystr(path)
    error = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert error < 0.08, f"{jax.tree_util.keystr(path)}: bf16 gradient off by {error:.3f} of its norm"


@pytest.mark.parametrize("fields,match", [
    (dict(mixers=("mamba2",), ssm_head_dim=24), "ssm_head_dim"),
    (dict(mixers=("mamba2",), ssm_head_dim=16, ssm_groups=3), "ssm_groups"),
    (dict(mixers=("attention",), polarization="both"), "polarization"),
    (dict(mixers=("mamba",), polarization="zero", polarization_zero_A=0.0), "polarization_zero_A=0.0 must be negative"),
    (dict(mixers=("mamba", "attention"), positional="tape"), "TAPE"),
    (dict(mixers=("gla",), ssm_impl="associative"), "associative"),
    (dict(mixers=("gla",), gla_heads=3), "gla_heads"),
    (dict(mixers=("gla",), ssm_chunk=24), "ssm_chunk"),
    (dict(mixers=("s4d",), ssm_state=7), "ssm_state"),
    (dict(mixers=("mamba",), ssm_impl="fast"), "ssm_impl"),
])
def test_bad_configs_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**BASE, **fields})
