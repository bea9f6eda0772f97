"""The MoE sparsity study: does sparsity help generalization (Zhao, Wang & Wang 2024,
"Generalization Error Analysis for Sparse Mixture-of-Experts")? Their bound grows with
the number of chosen experts k about linearly (times log(E/k)) and with the number of
experts E only logarithmically, so the train-validation gap should grow with k much
faster than with E.

  python experiments/moe_sparsity/run.py --workdir=runs/moe_sparsity               # CPU, ~45 min
  python experiments/moe_sparsity/run.py --workdir=... --size=accelerator

Arms, each with jaxlab's Trainer (a run per arm and seed, resumable), on a small slice of
CPython's docs trained for several epochs so that the gap is measurable:
- ``dense``: the dense MLP (width W); ``dense_total``: a dense MLP as wide as the E=8,
  k=2 mixture's experts together (equal total parameters).
- ``moe_E{E}_k{k}`` for E in (4, 8, 16), k in (1, 2, 4): experts of width W / k, so every
  arm has the dense model's active FFN parameters; gates renormalized over the k chosen
  (Mixtral), except k = 1, which keeps Switch's gate (the expert's probability).
- ``dts_gumbel``, ``dts_activation``: E=8, k=2 with the dense-to-sparse gates (EvoMoE's,
  Nguyen et al.'s tanh activation gate), dense for the first 60% of the steps.
- ``upcycled``: the dense model trained for half the steps, upcycled into E=8, k=2
  experts of width W, trained for the steps that make its training FLOPs equal those of
  ``scratch`` (the same mixture from scratch for all the steps).
The gap is the validation loss minus the loss on the training windows, both in eval mode.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from jaxlab.train import base_config, train_to_end
from jaxlab.train.build import build_run
from jaxlab.train.flops import train_flops_per_token

HERE = Path(__file__).resolve().parent
SIZES = {
    "cpu": dict(steps=500, corpus_bytes=120_000, model=dict(vocab_size=384, d_model=128, num_layers=2, num_heads=4,
                                                              num_kv_heads=2, mlp_dim=512)),
    "accelerator": dict(steps=5000, corpus_bytes=2_000_000, model=dict(vocab_size=384, d_model=512, num_layers=8,
                                                                         num_heads=8, num_kv_heads=4, mlp_dim=2048)),
}
GRID = [(e, k) for e in (4, 8, 16) for k in (1, 2, 4)]

_WORKDIR = flags.DEFINE_string("workdir", "runs/moe_sparsity", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where the tables go.")
_SIZE = flags.DEFINE_enum("size", "cpu", list(SIZES), "Model and step budget.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every arm.")
_ARMS = flags.DEFINE_list("arms", None, "Only these arms (default: all).")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies the step count (0.02 for a smoke run).")

log = logging.getLogger("jaxlab")


def config_for(seed: int, steps: int, **model):
  size = SIZES[_SIZE.value]
  config = base_config()
  config.seed = seed
  config.model.update(size["model"])
  config.model.update(model)
  config.data.update(source="domains", domains=dict(python_docs="builtin"), domain_max_bytes=size["corpus_bytes"],
                     val_fraction=0.1, seq_len=128, batch_size=16)
  config.optim.update(learning_rate=3e-3, warmup_steps=min(50, steps // 4))
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, eval_batches=None, num_samples=0)
  return config


def arms(steps: int) -> dict[str, dict]:
  width = SIZES[_SIZE.value]["model"]["mlp_dim"]
  moe = dict(ffns=("moe",), moe_aux_loss_weight=1e-2)
  out = {"dense": {}, "dense_total": dict(mlp_dim=8 * width // 2)}
  # k = 1 gates are Switch's (the chosen expert's probability): renormalized to 1 the router would get no gradient
  out.update({f"moe_E{e}_k{k}": dict(**moe, moe_num_experts=e, moe_top_k=k, moe_expert_dim=width // k,
                                     moe_renormalize=k > 1) for e, k in GRID})
  schedule = dict(moe_router="dense_to_sparse", moe_dts_decay_steps=max(1, steps // 2),
                  moe_dts_switch_step=int(0.6 * steps))
  out["dts_gumbel"] = dict(**moe, moe_num_experts=8, moe_top_k=2, moe_expert_dim=width // 2, **schedule)
  out["dts_activation"] = dict(**out["dts_gumbel"], moe_dts_gate="activation", moe_dts_activation="tanh")
  out["scratch"] = dict(**moe, moe_num_experts=8, moe_top_k=2)  # experts of the dense width: upcycling's target
  return out


def flops(config) -> float:
  """Training FLOPs per token of a config's model (active parameters for a mixture)."""
  setup = build_run(config)
  return train_flops_per_token(setup.abstract.params, setup.model_config, config.data.seq_len)


def run(name: str, config, workdir: Path) -> dict:
  start = time.time()
  trainer, _ = train_to_end(config, workdir)
  validation = trainer.evaluate_source(trainer.state, trainer.sources.validation)
  train = trainer.evaluate_source(trainer.state, trainer.sources.train)
  parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))
  return {"arm": name, "seed": config.seed, "steps": config.train.steps, "parameters": parameters,
          "flops_per_token": train_flops_per_token(trainer.abstract.params, trainer.model_config,
                                                   config.data.seq_len),
          "train_loss": train["loss"], "val_loss": validation["loss"], "gap": validation["loss"] - train["loss"],
          "seconds": time.time() - start}


def upcycled(seed: int, steps: int, workdir: Path) -> dict:
  """Dense for half the steps, then upcycled and trained to the scratch mixture's FLOPs."""
  dense = config_for(seed, steps // 2)
  run("upcycled/dense", dense, workdir / "dense")
  moe = config_for(seed, 2, **arms(steps)["scratch"])
  ratio = flops(dense) / flops(moe)
  moe_steps = max(2, round(steps - (steps // 2) * ratio))
  moe = config_for(seed, moe_steps, **arms(steps)["scratch"])
  moe.init.upcycle_from = str(workdir / "dense")
  result = run("upcycled", moe, workdir / "moe")
  result.update(dense_steps=steps // 2, flops_ratio_dense_over_moe=ratio)
  return result


def summarize(results: list[dict]) -> str:
  names = list(dict.fromkeys(r["arm"] for r in results if r["arm"] != "upcycled/dense"))
  lines = ["| arm | parameters | steps | train loss | val loss | gap (val - train) |", "|---|---|---|---|---|---|"]
  for name in names:
    runs = [r for r in results if r["arm"] == name]
    cell = lambda key: (f"{np.mean([r[key] for r in runs]):.3f} ± {np.std([r[key] for r in runs]):.3f}"  # noqa: E731
                        if len(runs) > 1 else f"{runs[0][key]:.3f}")
    lines.append(f"| {name} | {runs[0]['parameters']:,} | {runs[0]['steps']} | {cell('train_loss')} | "
                 f"{cell('val_loss')} | {cell('gap')} |")
  return "\n".join(lines) + f"\n\nmean ± std over seeds {sorted({r['seed'] for r in results})}\n"


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results_dir = Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  path = results_dir / "results.json"
  results = json.loads(path.read_text()) if path.exists() else []
  done = {(r["arm"], r["seed"]) for r in results}
  steps = max(4, int(SIZES[_SIZE.value]["steps"] * _SCALE.value))
  for seed in map(int, _SEEDS.value):
    for name, model in arms(steps).items():
      if (_ARMS.value and name not in _ARMS.value) or (name, seed) in done:
        continue
      results.append(run(name, config_for(seed, steps, **model), Path(_WORKDIR.value) / name / str(seed)))
      log.warning("%s", json.dumps(results[-1]))
      path.write_text(json.dumps(results, indent=1))
    if ("upcycled", seed) not in done and (not _ARMS.value or "upcycled" in _ARMS.value):
      results.append(upcycled(seed, steps, Path(_WORKDIR.value) / "upcycled" / str(seed)))
      log.warning("%s", json.dumps(results[-1]))
      path.write_text(json.dumps(results, indent=1))
  summary = summarize(results)
  (results_dir / "summary.md").write_text(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
