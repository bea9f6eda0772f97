"""Growth operators: identity insertion and Net2Net widening compute the small model's
function where their papers say they do (on every block type), a randomly widened
residual stream stays within the stated RMSNorm bound, AKI reads the next layer, LiGO at
a one-hot init is the stacking and copy baseline, and configs that cannot grow are
refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import growth
from jaxlab.growth.trees import by_name
from jaxlab.growth.width import UnitMap
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.nn.norms import RMSNorm

BASE = ModelConfig(vocab_size=53, d_model=24, num_layers=2, num_heads=3, mlp_dim=40, ssm_head_dim=8,
                   attention_impl="xla", ssm_impl="xla", ssm_chunk=16)
BLOCKS = {
    "attention": dict(),
    "gqa": dict(num_heads=4, num_kv_heads=2, d_model=32),
    "tape_biases_layernorm": dict(positional="tape", attention_bias=True, mlp_bias=True, norm="layernorm",
                                  attention_gate="headwise"),
    "gated_learned_positions": dict(attention_gate="elementwise", positional="learned"),
    "mamba_polarized": dict(mixers=("mamba",), ssm_impl="sequential", polarization="both"),
    "mamba2": dict(mixers=("mamba2",)),
    "gla": dict(mixers=("gla",)),
    "s4d": dict(mixers=("s4d",)),
    "moe_shared": dict(ffns=("moe",), moe_num_experts=4, moe_top_k=2, moe_shared_experts=1, moe_shared_gate=True),
    "tied": dict(tie_embeddings=True),
    "pregated_moe": dict(ffns=("moe",), moe_router="pregate", moe_num_experts=4, moe_top_k=1, moe_pregate_dim=8,
                         moe_pregate_heads=2),
    "hybrid": dict(mixers=("attention", "mamba"), ffns=("mlp", "moe"), ssm_impl="sequential", moe_num_experts=4),
}
TOKENS = jax.random.randint(jax.random.key(1), (2, 13), 0, BASE.vocab_size)


def config(block: str, **overrides) -> ModelConfig:
  return dataclasses.replace(BASE, **{**BLOCKS[block], **overrides})


def trained_like(config: ModelConfig, seed: int = 0) -> nnx.State:
  """Initial parameters moved off their init (TAPE's and others' zeros would hide errors)."""
  params = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)[1]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def logits(config: ModelConfig, params: nnx.State) -> jax.Array:
  graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rest = jax.tree.map(jnp.zeros_like, rest)
  return jax.jit(lambda p: nnx.merge(graphdef, p, rest)(TOKENS))(params)


def grow_jit(params, small, target, operator, **options):
  """``growth.grow`` under ``jax.jit``, as a run calls it."""
  return jax.jit(lambda p: growth.grow(p, small, target, operator, **options))(params)


def wider(small: ModelConfig, factor: int = 2, layers: int = 4) -> ModelConfig:
  """Every space ``factor`` times wider: the stream, heads (width kept), neurons, experts'
  neurons, SSM channels."""
  return dataclasses.replace(
      small, num_layers=layers, d_model=factor * small.d_model, num_heads=factor * small.num_heads,
      num_kv_heads=None if small.num_kv_heads is None else factor * small.num_kv_heads,
      mlp_dim=factor * small.mlp_dim,
      moe_expert_dim=None if small.moe_expert_dim is None else factor * small.moe_expert_dim,
      gla_heads=None if small.gla_heads is None else factor * small.gla_heads)


@pytest.mark.parametrize("block", BLOCKS)
def test_identity_insertion_preserves_the_function_exactly(block):
  small = config(block)
  params = trained_like(small)
  deep = dataclasses.replace(small, num_layers=4)
  np.testing.assert_array_equal(logits(deep, grow_jit(params, small, deep, "identity")), logits(small, params))


@pytest.mark.parametrize("block", BLOCKS)
def test_net2net_with_equal_copy_counts_preserves_the_function(block):
  small = config(block)
  params = trained_like(small, seed=1)
  target = wider(small)
  grown = grow_jit(params, small, target, "net2net", mapping="cyclic")
  np.testing.assert_allclose(logits(target, grown), logits(small, params), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("operator", ["net2net", "bert2bert"])
@pytest.mark.parametrize("block", ["attention", "mamba_polarized", "gla", "moe_shared", "tape_biases_layernorm"])
def test_random_widening_inside_layers_is_exact(block, operator):
  """Heads, neurons, SSM channels and Δ rank are read by linear maps: any mapping is exact
  (Mamba-2's gated RMSNorm over its inner width is not: it behaves like the stream's)."""
  small = config(block, head_dim=8, ssm_dt_rank=3)
  wide = dict(num_heads=5, mlp_dim=67, ssm_expand=3, ssm_dt_rank=5, tape_position_size=17)
  if block == "moe_shared":
    wide.update(moe_expert_dim=57, moe_shared_dim=51)
  if block == "gla":  # GLA's head widths follow d_model: grow the heads with the stream
    small = config(block, head_dim=8, gla_heads=3, gla_expand_k=1.0, gla_expand_v=1.0)
    wide = dict(gla_heads=5, d_model=40)
  target = dataclasses.replace(small, **wide)
  if operator == "bert2bert":
    target = dataclasses.replace(target, num_layers=4)
    small = dataclasses.replace(small, num_layers=4)
  params = trained_like(small, seed=2)
  grown = grow_jit(params, small, target, operator, mapping="random", seed=3)
  if block == "gla":  # the stream widened too (24 -> 40 is not a multiple): only within the RMSNorm bound
    assert float(jnp.abs(logits(target, grown) - logits(small, params)).max()) < 2.0
  else:
    np.testing.assert_allclose(logits(target, grown), logits(small, params), atol=3e-5, rtol=1e-5)


def test_grouped_query_heads_grow_within_their_groups():
  small = config("attention", num_heads=4, num_kv_heads=1, head_dim=8)  # MQA: 4 query heads per key-value head
  target = dataclasses.replace(small, num_heads=7, num_kv_heads=1)
  params = trained_like(small, seed=4)
  grown = grow_jit(params, small, target, "net2net", seed=1)
  np.testing.assert_allclose(logits(target, grown), logits(small, params), atol=2e-5, rtol=1e-5)
  two_groups = dataclasses.replace(small, num_heads=4, num_kv_heads=2)
  grown = grow_jit(trained_like(two_groups), two_groups, dataclasses.replace(two_groups, num_heads=12, num_kv_heads=3),
                      "net2net", seed=2)
  np.testing.assert_allclose(logits(dataclasses.replace(two_groups, num_heads=12, num_kv_heads=3), grown),
                             logits(two_groups, trained_like(two_groups)), atol=2e-5, rtol=1e-5)


def test_a_randomly_widened_stream_stays_within_the_rmsnorm_bound():
  """RMSNorm of the copied stream Ph is ρ·P·norm(h), ρ in [sqrt(q/(n c_max)), sqrt(q/(n c_min))]."""
  n, q = 24, 41
  unit_map = UnitMap.draw(n, q, "random", np.random.default_rng(0))
  counts = unit_map.counts
  h = jax.random.normal(jax.random.key(2), (5, n)) * jnp.linspace(0.2, 3.0, n)[None]
  small_norm, wide_norm = RMSNorm(n, eps=1e-6), RMSNorm(q, eps=1e-6)
  expected = np.asarray(small_norm(h))[:, unit_map.index]
  ratio = np.asarray(wide_norm(h[:, unit_map.index])) / expected
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)  # one ρ per token
  assert np.all(ratio >= np.sqrt(q / (n * counts.max())) - 1e-6)
  assert np.all(ratio <= np.sqrt(q / (n * counts.min())) + 1e-6)
  assert np.abs(ratio - 1).max() > 1e-3  # and the bound is not vacuous: ρ != 1 here


def test_aki_takes_new_units_from_the_next_layer():
  small = config("attention", num_layers=3)
  target = dataclasses.replace(small, mlp_dim=64, num_layers=3)
  params = trained_like(small, seed=5)
  fpi = by_name(grow_jit(params, small, target, "bert2bert", seed=7))
  aki = by_name(grow_jit(params, small, target, "aki", seed=7))
  source = {name: np.asarray(v) for name, v in by_name(params).items()}
  first_row = np.asarray(fpi["blocks/0/ffn/up/kernel"])[0]
  index = np.array([int(np.flatnonzero(source["blocks/0/ffn/up/kernel"][0] == v)[0]) for v in first_row])  # FPI's g
  np.testing.assert_array_equal(aki["blocks/0/ffn/up/kernel"][:, :40], source["blocks/0/ffn/up/kernel"])
  np.testing.assert_array_equal(aki["blocks/0/ffn/up/kernel"][:, 40:], source["blocks/1/ffn/up/kernel"][:, index[40:]])
  np.testing.assert_array_equal(aki["blocks/2/ffn/up/kernel"], fpi["blocks/2/ffn/up/kernel"])  # the top reads itself
  counts = np.bincount(index, minlength=40)
  np.testing.assert_allclose(aki["blocks/0/ffn/down/kernel"][40:],
                             source["blocks/1/ffn/down/kernel"][index[40:]] / counts[index[40:], None], rtol=1e-6)


@pytest.mark.parametrize("block", ["attention", "gqa", "tape_biases_layernorm", "mamba_polarized", "mamba2", "gla",
                                   "s4d", "moe_shared", "tied", "hybrid"])
def test_ligo_at_a_one_hot_init_is_stacking_with_copied_width(block):
  small = config(block)
  target = wider(small)
  params = trained_like(small, seed=6)
  ligo = growth.LiGO(small, target, mapping="random", seed=4)
  one_hot = ligo.apply(ligo.init(depth_init="stack", width_init="copy"), params)
  baseline = grow_jit(params, small, target, "stack", width="copy", mapping="random", seed=4)
  for name, value in by_name(baseline).items():
    np.testing.assert_array_equal(by_name(one_hot)[name], value, err_msg=name)


def test_ligo_init_follows_the_official_schemes_and_is_trainable():
  small = config("gqa")
  target = wider(small, layers=5)
  ligo = growth.LiGO(small, target, seed=1)
  theta = ligo.init()  # stackbert_noisy, rand
  depth = theta["depth/blocks/3/mixer/q/kernel"]
  np.testing.assert_allclose(float(depth.sum()), 1.0, rtol=1e-6)
  assert int(jnp.argmax(depth)) == 3 % small.num_layers and float(depth.max()) > 0.9
  assert theta["depth/blocks/3/mixer/q/kernel"] is not theta["depth/blocks/3/mixer/k/kernel"]
  width = theta["width/embed"]
  assert width.shape == (target.d_model - small.d_model, small.d_model)
  np.testing.assert_allclose(np.asarray(width.sum(axis=1)), 1.0, rtol=1e-5)
  assert float(width.min()) >= 0
  assert {"width/3/heads", "width/3/kv_heads", "width/3/mlp"} <= set(theta)
  params = trained_like(small)

  def loss(theta):
    out = logits(target, ligo.apply(theta, params))
    return jnp.mean(jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, TOKENS[..., None], axis=-1)[..., 0])

  grads = jax.grad(loss)(theta)
  for name, grad in grads.items():
    assert bool(jnp.all(jnp.isfinite(grad))), name
  assert float(jnp.abs(grads["width/embed"]).max()) > 0
  assert float(jnp.abs(grads["depth/blocks/4/ffn/down/kernel"]).max()) > 0


def test_kronecker_factorized_ligo_is_the_full_map_at_c_equal_to_the_product():
  small = config("attention", d_model=32, num_heads=4, mlp_dim=32)
  target = dataclasses.replace(small, d_model=64, num_heads=8, mlp_dim=64, num_layers=3)
  factored = growth.LiGO(small, target, seed=2, kronecker=4)
  theta = factored.init()
  assert theta["width/embed/outer"].shape == (8, 8) and theta["width/embed/inner"].shape == (4, 4)
  np.testing.assert_allclose(np.asarray(jnp.kron(theta["width/embed/outer"], theta["width/embed/inner"]).sum(1)), 1.0,
                             rtol=1e-5)
  full = growth.LiGO(small, target, seed=2)
  dense_theta = {name: value for name, value in theta.items() if not name.endswith(("/outer", "/inner"))}
  for name in {n.rsplit("/", 1)[0] for n in theta if n.endswith("/outer")}:
    dense_theta[name] = jnp.kron(theta[f"{name}/outer"], theta[f"{name}/inner"])
  assert set(dense_theta) == set(full.init())
  params = trained_like(small)
  for name, value in by_name(factored.apply(theta, params)).items():
    np.testing.assert_array_equal(value, by_name(full.apply(dense_theta, params))[name], err_msg=name)
  with pytest.raises(ValueError, match="width_init='rand'"):
    factored.init(width_init="copy")


def test_net2net_noise_moves_only_new_units():
  small = config("attention")
  target = dataclasses.replace(small, mlp_dim=48)
  params = trained_like(small)
  grown = by_name(grow_jit(params, small, target, "net2net", noise=0.1, seed=3))
  exact = by_name(grow_jit(params, small, target, "net2net", seed=3))
  up, up_exact = np.asarray(grown["blocks/1/ffn/up/kernel"]), np.asarray(exact["blocks/1/ffn/up/kernel"])
  np.testing.assert_array_equal(up[:, :40], up_exact[:, :40])
  assert np.abs(up[:, 40:] - up_exact[:, 40:]).min() > 0
  np.testing.assert_array_equal(grown["blocks/1/mixer/q/kernel"], exact["blocks/1/mixer/q/kernel"])


def test_more_experts_copy_experts_and_router_columns():
  """More experts are copies (and their router columns): exact under a dense mixture,
  not under top-k, whose ties pick copies over the next expert (documented)."""
  small = config("moe_shared")
  target = dataclasses.replace(small, moe_num_experts=6)
  grown = by_name(grow_jit(trained_like(small), small, target, "net2net", seed=0))
  router = np.asarray(grown["blocks/0/ffn/router/kernel"])
  up = np.asarray(grown["blocks/0/ffn/experts/up"])
  for new in (4, 5):
    source = int(np.flatnonzero(np.all(router[:, :4] == router[:, new:new + 1], axis=0))[0])
    np.testing.assert_array_equal(up[new], up[source])


def test_mslt_trains_only_the_new_layers():
  small = config("attention")
  assert growth.new_layers(small, dataclasses.replace(small, num_layers=5), "stack") == r"^blocks/(2|3|4)/"


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=64), "model.vocab_size"),
    (dict(num_heads=4), "head width 8 -> 6"),
    (dict(mlp_dim=30), "mlp: 40 -> 30"),
    (dict(num_layers=1), "cannot remove layers"),
    (dict(ssm_state=8), "model.ssm_state"),
])
def test_configs_that_cannot_grow_are_refused_by_name(change, message):
  small = config("attention")
  with pytest.raises(ValueError, match=message):
    grow_jit(trained_like(small), small, dataclasses.replace(small, **change), "stack")


def test_refusals_specific_to_operators_and_patterns():
  small = config("attention")
  with pytest.raises(ValueError, match="identity insertion grows depth only"):
    growth.check_grow(small, dataclasses.replace(small, mlp_dim=48), "identity")
  with pytest.raises(ValueError, match="operator='grow_big'"):
    growth.check_grow(small, small, "grow_big")
  hybrid = config("hybrid", num_layers=2)
  with pytest.raises(ValueError, match="blocks differ"):
    growth.check_grow(hybrid, dataclasses.replace(hybrid, num_layers=3), "interleave")
  with pytest.raises(TypeError, match="train_state.params"):
    growth.grow(dataclasses.make_dataclass("S", ["opt_state"])(None), small, small, "stack")
