"""The Read-ME study: a dense LM trained on three domains, refactored into a pre-gated
mixture (Cai et al., NeurIPS 2024), against the dense model, random expert routing,
shared-only and top-1 upcycling at equal active FFN; with the cross-layer agreement of
the per-layer oracle choices, the router's agreement with them, and the batching
simulation over the router's choices.

  python experiments/readme_refactor/run.py --workdir=runs/readme_refactor             # CPU, ~30 min
  python experiments/readme_refactor/run.py --workdir=... --size=accelerator

Steps (the official pipeline of `jaxlab.growth.readme`, at our scale):
1. ``dense``: domains_small (docs prose, stdlib code, reversed-digit arithmetic), trained
   with jaxlab's Trainer; ``dense_half``: the same with half the MLP width (the active FFN
   of a Read-ME token), the source of the upcycling arm.
2. Channel importance per domain (mean |down-projection input| over training windows),
   the top half per domain, shared expert = their intersection, expert d = the rest.
3. Alternating rounds (``scripts/train.sh``): the pre-gating router trained on Read-ME's
   targets with the backbone frozen, then the backbone trained on the LM loss with the
   router frozen.
4. Per-domain validation loss of every arm; oracle agreement; the batching simulation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from jaxlab import data as data_lib
from jaxlab import serving
from jaxlab.growth import readme
from jaxlab.nn import ModelConfig, Transformer
from jaxlab.train import Trainer, load_config_module, train_to_end
from jaxlab.train.build import build_run
from jaxlab.train.state import TrainState

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SIZES = {
    "cpu": dict(dense_steps=800, router_steps=100, backbone_steps=100, rounds=3, importance_batches=16,
                eval_batches=16, model={}),
    "accelerator": dict(dense_steps=5000, router_steps=300, backbone_steps=500, rounds=5, importance_batches=64,
                        eval_batches=64, model=dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                                                    mlp_dim=2048)),
}

_WORKDIR = flags.DEFINE_string("workdir", "runs/readme_refactor", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where the tables go.")
_SIZE = flags.DEFINE_enum("size", "cpu", list(SIZES), "Model and step budget.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies every step count (0.05 for a smoke run).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")
_ROUTER_LR = flags.DEFINE_float("router_lr", 1e-3, "Router phase learning rate (Adam).")
_BACKBONE_LR = flags.DEFINE_float("backbone_lr", 1e-3, "Backbone phase peak learning rate.")

log = logging.getLogger("jaxlab")


def steps(name: str) -> int:
  return max(2, int(SIZES[_SIZE.value][name] * _SCALE.value))


def base_config():
  config = load_config_module(REPO / "experiments" / "configs" / "domains_small.py").get_config()
  config.model.update(SIZES[_SIZE.value]["model"])
  config.seed = _SEED.value
  config.train.update(steps=steps("dense_steps"), eval_every=steps("dense_steps"),
                      checkpoint_every=steps("dense_steps"), eval_batches=8, num_samples=0)
  config.optim.warmup_steps = min(config.optim.warmup_steps, config.train.steps // 2)
  return config


def train(config, workdir: Path) -> Trainer:
  return train_to_end(config, workdir)[0]


def model_of(trainer: Trainer) -> Transformer:
  return nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.model_state)


def domain_batches(windows, count: int, batch_size: int):
  """The first ``count`` batches of ``windows`` (a domain's PackedWindows)."""
  count = min(count, len(windows) // batch_size)
  for b in range(count):
    records = [windows[i] for i in range(b * batch_size, (b + 1) * batch_size)]
    yield {k: np.stack([r[k] for r in records]) for k in ("inputs", "targets", "weights")}


def domain_losses(model: Transformer, splits, routing, batch_size: int, count: int) -> dict[str, float]:
  """Validation loss per domain; ``routing(tokens, domain_id)`` gives experts or None."""
  forward = nnx.jit(lambda m, x, e: m(x, experts=e))
  losses = {}
  for domain, (name, split) in enumerate(splits.items()):
    total, weight = 0.0, 0.0
    for batch in domain_batches(split.validation, count, batch_size):
      logits = forward(model, jnp.asarray(batch["inputs"]), routing(batch["inputs"], domain))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
      total += float(jnp.sum(ce * batch["weights"]))
      weight += float(batch["weights"].sum())
    losses[name] = total / weight
  losses["mean"] = float(np.mean([losses[n] for n in splits]))
  return losses


def rounds() -> int:
  return SIZES[_SIZE.value]["rounds"]


def readme_run(config, readme_config: ModelConfig, params):
  """The Read-ME model's run (its train step trains all but the router) and initial state."""
  run_config = config.copy_and_resolve_references()
  run_config.model = dataclasses.asdict(readme_config)
  total = rounds() * steps("backbone_steps")
  run_config.train.steps = total
  run_config.optim.update(learning_rate=_BACKBONE_LR.value, warmup_steps=min(10, total // 2),
                          trainable="^(?!pregate/)")
  setup = build_run(run_config)
  model_state = nnx.split(Transformer(readme_config, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=setup.tx.init(params), rng=jax.random.PRNGKey(config.seed))
  return setup, jax.device_put(state, setup.shardings)


def router_trainer(readme_model: Transformer, dense: Transformer, carving, tx):
  """Read-ME's router phase step: only the pre-gating router learns, on targets from the
  dense model's activations (`readme.router_targets`, `readme.router_loss`)."""
  router_graphdef = nnx.graphdef(readme_model.pregate)
  dense_graphdef, dense_state = nnx.split(dense)

  @jax.jit
  def step(router_params, opt_state, batch):
    scores = readme.router_targets(readme.down_inputs(nnx.merge(dense_graphdef, dense_state), batch["inputs"]),
                                   carving)
    positions = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1]), batch["inputs"].shape)

    def loss(router_params):
      logits = nnx.merge(router_graphdef, router_params)(batch["inputs"], positions)
      return readme.router_loss(logits, scores, batch["weights"])

    value, grads = jax.value_and_grad(loss)(router_params)
    updates, opt_state = tx.update(grads, opt_state, router_params)
    return optax.apply_updates(router_params, updates), opt_state, value

  return step


def agreement(readme_model: Transformer, dense: Transformer, carving, splits, batch_size: int, count: int) -> dict:
  """Per-layer oracle choices (argmax of the router targets): how often two layers agree,
  how often they name the token's own domain, and how often the router's top-1 matches."""
  oracle_of = nnx.jit(lambda m, x: jnp.argmax(readme.router_targets(readme.down_inputs(m, x), carving), -1))
  router_of = nnx.jit(lambda m, x: jnp.argmax(m.pregate(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)), -1))
  oracles, routers, domains = [], [], []
  for domain, split in enumerate(splits.values()):
    for batch in domain_batches(split.validation, count, batch_size):
      x = jnp.asarray(batch["inputs"])
      oracles.append(np.asarray(oracle_of(dense, x)).reshape(len(carving.shared), -1))
      routers.append(np.asarray(router_of(readme_model, x)).reshape(-1))
      domains.append(np.full(x.size, domain))
  oracle, router, domain = np.concatenate(oracles, 1), np.concatenate(routers), np.concatenate(domains)
  layers = oracle.shape[0]
  return {
      "cross_layer": [[float(np.mean(oracle[i] == oracle[j])) for j in range(layers)] for i in range(layers)],
      "oracle_is_domain": [float(np.mean(oracle[i] == domain)) for i in range(layers)],
      "router_vs_oracle": [float(np.mean(router == oracle[i])) for i in range(layers)],
      "router_is_domain": float(np.mean(router == domain)),
      "chance": 1.0 / carving.experts.shape[1],
  }


def batching(readme_model: Transformer, splits, batch_size: int, seed: int) -> dict:
  """The batching simulation over the trained router's choices on validation sequences
  (each a request: a quarter prompt, the rest output), FCFS against expert-aware."""
  router_of = nnx.jit(lambda m, x: jnp.argmax(m.pregate(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)), -1))
  choices = []
  for split in splits.values():
    for batch in domain_batches(split.validation, 4, batch_size):
      choices += list(np.asarray(router_of(readme_model, jnp.asarray(batch["inputs"]))))
  order = np.random.default_rng(seed).permutation(len(choices))
  choices = [choices[i] for i in order]
  arrivals = np.cumsum(np.random.default_rng(seed + 1).exponential(1 / 40.0, len(choices)))
  trace = serving.trace_from_choices(arrivals, choices, prompt_tokens=len(choices[0]) // 4)
  out = {}
  for cache in (None, 1):
    for name, scheduler in (("fcfs", serving.fcfs), ("expert_aware", serving.expert_aware)):
      report = serving.simulate(trace, scheduler, max_batch=8, cache_experts=cache)
      out[f"{name}/cache_{cache}"] = report.summary()
  return out


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxlab").setLevel(logging.INFO)
  start = time.time()
  workdir, results_dir = Path(_WORKDIR.value), Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  config = base_config()
  size = SIZES[_SIZE.value]
  batch_size = config.data.batch_size
  eval_count = size["eval_batches"]

  dense_trainer = train(config, workdir / "dense")
  half = config.copy_and_resolve_references()
  half.model.mlp_dim = config.model.mlp_dim // 2
  half_trainer = train(half, workdir / "dense_half")
  dense, splits = model_of(dense_trainer), dense_trainer.sources.domains
  dense_config = dense_trainer.model_config
  results = {"size": _SIZE.value, "seed": _SEED.value, "domains": list(splits), "steps": {
      "dense": config.train.steps, "router": steps("router_steps"), "backbone": steps("backbone_steps"),
      "rounds": rounds()}}

  importance = jnp.stack([readme.channel_importance(dense, domain_batches(s.train, size["importance_batches"],
                                                                          batch_size)) for s in splits.values()])
  carving = readme.Carving.from_masks(readme.domain_masks(importance, keep=0.5))
  params, readme_config = readme.carve(dense_trainer.state.params, dense_config, carving, seed=_SEED.value)
  width = dense_config.mlp_dim
  results["carving"] = {
      "shared_width": carving.shared.sum(-1).tolist(),
      "expert_widths": carving.experts.sum(-1).tolist(),
      "active_fraction": float(np.mean((carving.shared.sum(-1)[:, None] + carving.experts.sum(-1)) / width)),
  }
  setup, state = readme_run(config, readme_config, params)
  model_of_state = lambda s: nnx.merge(setup.graphdef, s.params, s.model_state)  # noqa: E731
  rng = np.random.default_rng(_SEED.value)
  random_experts = lambda x, d: jnp.asarray(rng.integers(0, len(splits), x.shape), jnp.int32)  # noqa: E731
  oracle_experts = lambda x, d: jnp.full(x.shape, d, jnp.int32)  # noqa: E731
  losses = lambda m, routing: domain_losses(m, splits, routing, batch_size, eval_count)  # noqa: E731

  def shared_only(model_state):
    model = model_of_state(model_state)
    for block in model.blocks:
      block.ffn.experts.down[...] = jnp.zeros_like(block.ffn.experts.down[...])
    return model

  carved = model_of_state(state)
  results["loss"] = {
      "dense": losses(dense, lambda x, d: None),
      "dense_half": losses(model_of(half_trainer), lambda x, d: None),
      "carved/oracle_domain": losses(carved, oracle_experts),
      "carved/random": losses(carved, random_experts),
      "carved/shared_only": losses(shared_only(state), oracle_experts),
  }
  log.info("after carving: %s", json.dumps(results["loss"]))

  tx = optax.adam(_ROUTER_LR.value)
  router_step = router_trainer(carved, dense, carving, tx)
  router_params = state.params["pregate"]
  opt_state = tx.init(router_params)
  data = iter(data_lib.train_dataset(dense_trainer.sources.train, batch_size, _SEED.value + 17))
  history = []
  for round_ in range(rounds()):
    for _ in range(steps("router_steps")):
      batch = {k: jnp.asarray(v) for k, v in next(data).items() if k != "domain"}
      router_params, opt_state, value = router_step(router_params, opt_state, batch)
    state.params["pregate"] = router_params
    history.append({"round": round_, "router_loss": float(value)})
    for _ in range(steps("backbone_steps")):
      batch = {k: jnp.asarray(v) for k, v in next(data).items() if k != "domain"}
      state, metrics = setup.train_step(state, batch)
    router_params = state.params["pregate"]
    history[-1]["backbone_loss"] = float(metrics["loss"])
    history[-1]["loss"] = losses(model_of_state(state), lambda x, d: None)
    log.info("round %d: %s", round_, json.dumps(history[-1]))
  results["rounds"] = history
  model = model_of_state(state)
  results["loss"].update({
      "readme/router": losses(model, lambda x, d: None),
      "readme/oracle_domain": losses(model, oracle_experts),
      "readme/random": losses(model, random_experts),
  })
  results["agreement"] = agreement(model, dense, carving, splits, batch_size, 4)

  upcycle = half.copy_and_resolve_references()
  upcycle.model.update(ffns=("moe",), moe_num_experts=len(splits), moe_top_k=1)
  upcycle.init.upcycle_from = str(workdir / "dense_half")
  total = rounds() * steps("backbone_steps")
  upcycle.train.update(steps=total, eval_every=total, checkpoint_every=total)
  upcycle.optim.update(learning_rate=_BACKBONE_LR.value, warmup_steps=min(10, total // 2))
  results["loss"]["upcycled_half_top1"] = losses(model_of(train(upcycle, workdir / "upcycled_half")),
                                                 lambda x, d: None)
  results["batching"] = batching(model, splits, batch_size, _SEED.value)
  results["minutes"] = (time.time() - start) / 60
  (results_dir / f"results_seed{_SEED.value}.json").write_text(json.dumps(results, indent=1))
  print(json.dumps(results["loss"], indent=1))


if __name__ == "__main__":
  app.run(main)
