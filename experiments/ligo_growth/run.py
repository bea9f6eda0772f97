"""The growth study: does a large LM grown from a trained small one reach the loss of
training from scratch with fewer FLOPs (LiGO, Wang et al., ICLR 2023, and its baselines)?

  python experiments/ligo_growth/run.py --workdir=runs/ligo_growth                   # CPU, ~25 min a seed
  python experiments/ligo_growth/run.py --workdir=... --size=accelerator
  python experiments/ligo_growth/run.py --workdir=... --family=mamba2 --arms=scratch,bert2bert,ligo

The paper grows BERT-Small (6 layers, width 512) into BERT-Base (12, 768): twice the depth,
1.5 times the width. At CPU size the same shape: a 2-layer, width-128 byte-level LM on
CPython's docs grown into a 4-layer, width-192 one (3.9x the parameters). Every arm is a
jaxlab run (resumable); the large ones are started with ``init.grow_from``:
- ``scratch``: the large model from its own initialization;
- ``stack``: StackBERT's depth (layer i <- i mod L1) with plain copies for the width
  (what LiGO is at a one-hot init; with Net2Net's division it would be ``bert2bert``);
- ``mslt``: ``stack``, then only the new layers train for the first quarter of the steps
  (``optim.trainable``), then all of them (a second run continuing the first);
- ``bert2bert`` (FPI), ``aki``, ``net2net`` (Net2Net width, identity layers);
- ``ligo``: the operator trained (``init.ligo_*``), then the plain model. The paper trains
  it 100 steps of 400k (0.03%); 100 steps would be a sixth of the CPU budget, so the CPU
  size trains it 30 steps at lr 1e-3 (7.5% of the steps), the accelerator size 100 at 2e-4.
The small model's pretraining FLOPs are reported apart, as the paper does; LiGO's operator
steps count as full steps of the large model, MSLT's frozen-layer steps as forward passes
of the frozen layers plus full steps of the new ones. Each arm is evaluated on the whole
validation split every ``eval_every`` steps; "FLOPs to reach scratch" interpolates that
curve at scratch's final validation loss. ``--family=mamba2|moe`` grows a Mamba-2 or a
MoE LM (4 experts, top-2, experts widened with the MLP) the same way.
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

from jaxlab.growth import new_layers
from jaxlab.nn import ModelConfig
from jaxlab.train import RunPreempted, Trainer, base_config
from jaxlab.train.flops import train_flops_per_token
from jaxlab.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent
SIZES = {
    "cpu": dict(small_steps=600, steps=400, eval_every=40, ligo_steps=30, ligo_lr=1e-3, seq_len=128, batch_size=16,
                small=dict(d_model=128, num_layers=2, num_heads=4, mlp_dim=384),
                large=dict(d_model=192, num_layers=4, num_heads=6, mlp_dim=576)),
    "accelerator": dict(small_steps=20_000, steps=20_000, eval_every=1000, ligo_steps=100, ligo_lr=2e-4,
                        seq_len=512, batch_size=64,
                        small=dict(d_model=512, num_layers=6, num_heads=8, mlp_dim=2048),
                        large=dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072)),
}
ARMS = ("scratch", "stack", "mslt", "bert2bert", "aki", "net2net", "ligo")
# The same growth on the other families (``--family``): a Mamba-2 LM and a MoE LM.
FAMILIES = {"lm": {}, "mamba2": dict(mixers=("mamba2",), ssm_head_dim=32),
            "moe": dict(ffns=("moe",), moe_num_experts=4, moe_top_k=2)}
PAPER_SAVINGS = {"ligo": 44.7, "stack": 33, "mslt": 33, "bert2bert": 29}  # % FLOPs, BERT-Small -> Base

_WORKDIR = flags.DEFINE_string("workdir", "runs/ligo_growth", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where the tables go.")
_SIZE = flags.DEFINE_enum("size", "cpu", list(SIZES), "Model and step budget.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of every arm.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), "Arms to run.")
_FAMILY = flags.DEFINE_enum("family", "lm", list(FAMILIES), "The block type of both models.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies the step counts (0.02 for a smoke run).")

log = logging.getLogger("jaxlab")


def config_for(seed: int, model: dict, steps: int):
  size = SIZES[_SIZE.value]
  config = base_config()
  config.seed = seed
  config.model.update(vocab_size=384, **FAMILIES[_FAMILY.value], **model)
  config.data.update(source="python_docs", seq_len=size["seq_len"], batch_size=size["batch_size"])
  config.optim.update(learning_rate=3e-3, warmup_steps=min(50, steps // 4))
  every = max(1, round(size["eval_every"] * _SCALE.value))
  config.train.update(steps=steps, eval_every=every, checkpoint_every=steps, eval_batches=None, num_samples=0)
  return config


def train(config, workdir: Path, *, step0: dict | None = None) -> Trainer:
  """A finished run; with ``step0``, its initial model's validation loss goes there."""
  trainer = Trainer(config, workdir)
  if step0 is not None:
    step0["step0_val_loss"] = trainer.evaluate_source(trainer.init_state(), trainer.sources.validation)["loss"]
  if trainer.run()["preempted"]:  # stop the study too (rerun it to resume)
    raise RunPreempted(f"the run in {workdir} was stopped; rerun to resume")
  return trainer


def flops_per_step(trainer: Trainer) -> float:
  config = trainer.config
  tokens = config.data.batch_size * config.data.seq_len
  return tokens * train_flops_per_token(trainer.abstract.params, trainer.model_config, config.data.seq_len)


def curve(workdir: Path, step_flops: float, offset: float = 0.0, first_step: int = 0) -> list[list[float]]:
  """[FLOPs, validation loss] at every evaluation of a run."""
  return [[offset + (r["step"] - first_step) * step_flops, r["eval/loss"]]
          for r in read_metrics(workdir / "metrics.jsonl") if "eval/loss" in r]


def run_arm(name: str, seed: int, steps: int, small_dir: Path, workdir: Path) -> dict:
  start = time.time()
  size = SIZES[_SIZE.value]
  operator = {"scratch": None, "mslt": "stack"}.get(name, name)
  config = config_for(seed, size["large"], steps)
  if operator is not None:
    config.init.update(grow_from=str(small_dir), operator=operator, ligo_steps=size["ligo_steps"],
                       ligo_lr=size["ligo_lr"], width="copy" if operator == "stack" else "net2net")
  result = {"arm": name, "seed": seed, "steps": steps}
  if name == "mslt":  # stage 1: only the new layers; stage 2 continues with every layer
    small_model = ModelConfig.from_dict(config_for(seed, size["small"], 1).model)
    first = config.copy_and_resolve_references()
    first.train.steps = steps // 4
    first.optim.update(trainable=new_layers(small_model, ModelConfig.from_dict(config.model), "stack"),
                       warmup_steps=min(50, steps // 16))
    stage1 = train(first, workdir / "stage1", step0=result)
    new_fraction = 1 - small_model.num_layers / first.model.num_layers
    stage1_flops = flops_per_step(stage1) * (1 / 3 + 2 / 3 * new_fraction)  # forward all, backward the new
    second = config.copy_and_resolve_references()
    second.train.steps = steps - steps // 4
    second.init.update(grow_from=str(workdir / "stage1"), operator="identity")
    stage2 = train(second, workdir / "stage2")
    result["curve"] = (curve(workdir / "stage1", stage1_flops)
                       + curve(workdir / "stage2", flops_per_step(stage2), offset=(steps // 4) * stage1_flops))
  else:
    # LiGO's step 0 comes after its operator's training, which run() does.
    result["step0_val_loss"] = None
    trainer = train(config, workdir, step0=None if name == "ligo" else result)
    report_path = workdir / "init.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    result["operator_flops"] = report.get("ligo_flops", 0.0)
    if name == "ligo":
      result["operator_loss"] = [report["ligo_loss"][0], report["ligo_loss"][-1]]
    result["curve"] = curve(workdir, flops_per_step(trainer), offset=result["operator_flops"])
  result["final_val_loss"] = result["curve"][-1][1]
  result["seconds"] = time.time() - start
  return result


def flops_to_reach(points: list[list[float]], target: float) -> float | None:
  """The FLOPs at which a curve first reaches ``target`` (linear between evaluations)."""
  for (f0, l0), (f1, l1) in zip(points, points[1:]):
    if l1 <= target:
      return f0 + (f1 - f0) * (l0 - target) / (l0 - l1) if l0 > target else f0
  return None


def summarize(results: list[dict], smalls: dict) -> str:
  """Per arm, mean ± std over seeds: the loss at step 0 and at the end, the FLOPs to reach
  scratch's final loss and the saving against scratch's FLOPs, without and with the small
  model's pretraining counted."""
  seeds = sorted({r["seed"] for r in results})
  small = smalls[str(seeds[0])]
  lines = [f"small model: {small['parameters']:,} parameters, pretrained {small['steps']} steps "
           f"({small['flops']:.3g} FLOPs), validation loss {small['val_loss']:.3f}", "",
           "| arm | loss at step 0 | final val loss | FLOPs to reach scratch's final loss | saving | "
           "saving, small model's pretraining counted | paper's saving |", "|---|---|---|---|---|---|---|"]
  fmt = lambda xs, f, unit="": ("not reached" if any(x is None for x in xs) else  # noqa: E731
                                f"{np.mean(xs):{f}}{unit}" + (f" ± {np.std(xs):{f}}" if len(xs) > 1 else ""))
  for name in ARMS:
    runs = [r for r in results if r["arm"] == name]
    if not runs:
      continue
    reach, savings, counted = [], [], []
    for r in runs:
      scratch = next(s for s in results if s["arm"] == "scratch" and s["seed"] == r["seed"])
      total, pretraining = scratch["curve"][-1][0], 0.0 if name == "scratch" else smalls[str(r["seed"])]["flops"]
      needed = flops_to_reach(r["curve"], scratch["final_val_loss"])
      reach.append(needed)
      savings.append(None if needed is None else 100 * (1 - needed / total))
      counted.append(None if needed is None else 100 * (1 - (needed + pretraining) / total))
    step0 = [r["step0_val_loss"] for r in runs]
    paper = PAPER_SAVINGS.get(name)
    lines.append(f"| {name} | {'after its operator: n/a' if None in step0 else fmt(step0, '.3f')} | "
                 f"{fmt([r['final_val_loss'] for r in runs], '.3f')} | {fmt(reach, '.3g')} | "
                 f"{fmt(savings, '.1f', '%')} | "
                 f"{fmt(counted, '.1f', '%')} | {'' if paper is None else f'{paper}%'} |")
  return "\n".join(lines) + f"\n\nmean ± std over seeds {seeds}\n"


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results_dir = Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  path = results_dir / ("results.json" if _FAMILY.value == "lm" else f"results_{_FAMILY.value}.json")
  saved = json.loads(path.read_text()) if path.exists() else {"small": {}, "arms": []}
  done = {(r["arm"], r["seed"]) for r in saved["arms"]}
  size = SIZES[_SIZE.value]
  steps, small_steps = (max(8, int(size[k] * _SCALE.value)) for k in ("steps", "small_steps"))
  root = Path(_WORKDIR.value) / ("" if _FAMILY.value == "lm" else _FAMILY.value)
  for seed in map(int, _SEEDS.value):
    small_dir = root / "small" / str(seed)
    small_config = config_for(seed, size["small"], small_steps)
    small = train(small_config, small_dir)
    saved["small"][str(seed)] = {
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(small.state.params)),
        "steps": small_steps, "flops": small_steps * flops_per_step(small),
        "val_loss": curve(small_dir, 1.0)[-1][1]}
    for name in _ARMS.value:
      if (name, seed) in done:
        continue
      saved["arms"].append(run_arm(name, seed, steps, small_dir, root / name / str(seed)))
      log.warning("%s", json.dumps({k: v for k, v in saved["arms"][-1].items() if k != "curve"}))
      path.write_text(json.dumps(saved, indent=1))
  summary = summarize(saved["arms"], saved["small"])
  (results_dir / path.name.replace("results", "summary").replace(".json", ".md")).write_text(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
