"""The TAPE study: length generalization of reversed-digit addition and passkey
retrieval with RoPE, NoPE, ALiBi and TAPE at equal parameters and steps.

  python experiments/tape_arithmetic/run.py --workdir=runs/tape_study            # CPU, ~30 min
  python experiments/tape_arithmetic/run.py --workdir=... --size=accelerator     # paper scale

Each (task, encoding, seed) trains with jaxlab's Trainer in its own workdir (so the
study resumes where it stopped), then is scored by exact match per length; results go
to --results (JSON, plots, a markdown table).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlab.data.synthetic import Addition, Passkey  # noqa: E402
from jaxlab.nn import ModelConfig, Transformer  # noqa: E402
from jaxlab.train import load_config_module, train_to_end  # noqa: E402
from jaxlab.train.evaluate import sequence_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENCODINGS = ("rope", "none", "alibi", "tape")
TASKS = {
    "addition": dict(config="tape_arithmetic", lengths=(*range(1, 13), 16), trained_up_to=8, examples=100),
    "passkey": dict(config="tape_passkey", lengths=(32, 64, 128, 256, 512), trained_up_to=64, examples=100),
}

_WORKDIR = flags.DEFINE_string("workdir", "runs/tape_study", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where tables and plots go.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "accelerator"], "Model and step budget.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per encoding for addition (passkey uses 1).")
_ENCODINGS = flags.DEFINE_list("encodings", list(ENCODINGS), "Positional encodings to compare.")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "Tasks to run.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps (smoke tests).")


def load_config(name: str, arg: str):
  return load_config_module(REPO / "experiments" / "configs" / f"{name}.py").get_config(arg)


def parameter_count(model_fields: dict) -> int:
  model = nnx.eval_shape(lambda: Transformer(ModelConfig.from_dict(model_fields), rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def match_parameters(config) -> int:
  """Shrinks TAPE's MLP so that every encoding has (nearly) the same parameter count."""
  target = parameter_count({**config.model.to_dict(), "positional": "rope"})
  if config.model.positional == "tape":
    width = config.model.mlp_dim
    while parameter_count({**config.model.to_dict(), "mlp_dim": width}) > target:
      width -= 1
    config.model.mlp_dim = width
  return parameter_count(config.model.to_dict())


def source_at(task: str, length: int, examples: int):
  """Test examples whose operands (addition) or contexts (passkey) have this length."""
  if task == "addition":
    return Addition(min_digits=length, max_digits=length, num_examples=examples, seed=10**7 + length)
  return Passkey(min_len=length, max_len=length, num_examples=examples, seed=10**7 + length)


def run_one(task: str, encoding: str, seed: int, workdir: Path) -> dict:
  spec = TASKS[task]
  config = load_config(spec["config"], f"{encoding},{_SIZE.value}")
  config.seed = seed
  if _STEPS.value:
    config.train.update(steps=_STEPS.value, eval_every=_STEPS.value, checkpoint_every=_STEPS.value)
    config.optim.warmup_steps = min(config.optim.warmup_steps, _STEPS.value // 2)
  params = match_parameters(config)
  start = time.time()
  trainer, summary = train_to_end(config, workdir)
  metrics = {n: sequence_metrics(trainer.graphdef, trainer.state, source_at(task, n, spec["examples"]))
             for n in spec["lengths"]}
  return {"task": task, "encoding": encoding, "seed": seed, "parameters": params,
          "steps": config.train.steps, "final_train_loss": summary["last_train_loss"],
          "seconds": time.time() - start,
          "accuracy": {str(n): m["exact_match"] for n, m in metrics.items()},
          "token_accuracy": {str(n): m["token_accuracy"] for n, m in metrics.items()}}


def plot(task: str, results: list[dict], out: Path) -> None:
  """Exact match (left) and token accuracy (right) against length, mean ± std over seeds."""
  spec = TASKS[task]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("accuracy", "token_accuracy")):
    for encoding in ENCODINGS:
      runs = [r for r in results if r["task"] == task and r["encoding"] == encoding]
      if not runs:
        continue
      lengths = [int(n) for n in runs[0][metric]]
      values = np.array([[r[metric][str(n)] for n in lengths] for r in runs])
      ax.errorbar(lengths, values.mean(0), yerr=values.std(0) if len(runs) > 1 else None, marker="o",
                  ms=3, capsize=2, label=f"{encoding} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.axvline(spec["trained_up_to"], color="gray", ls="--", lw=1, label="longest trained")
    ax.set_xlabel("operand digits" if task == "addition" else "context length (tokens)")
    if task == "passkey":
      ax.set_xscale("log", base=2)
    ax.set_ylabel("exact match" if metric == "accuracy" else "answer-token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(task)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def table(task: str, results: list[dict], metric: str) -> str:
  runs = [r for r in results if r["task"] == task]
  lengths = list(runs[0][metric])
  lines = ["| encoding | params | " + " | ".join(lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
  for encoding in ENCODINGS:
    mine = [r for r in runs if r["encoding"] == encoding]
    if mine:
      cells = [f"{np.mean([r[metric][n] for r in mine]):.2f}" for n in lengths]
      lines.append(f"| {encoding} | {mine[0]['parameters']:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results_dir = Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  results_path = results_dir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else []
  done = {(r["task"], r["encoding"], r["seed"]) for r in results}
  for task in _TASKS.value:
    seeds = range(_SEEDS.value) if task == "addition" else range(1)
    for encoding in _ENCODINGS.value:
      for seed in seeds:
        if (task, encoding, seed) in done:
          continue
        workdir = Path(_WORKDIR.value) / task / encoding / str(seed)
        result = run_one(task, encoding, seed, workdir)
        logging.getLogger("jaxlab").warning("%s", json.dumps(result))
        results.append(result)
        results_path.write_text(json.dumps(results, indent=1))
  summary = []
  for task in _TASKS.value:
    plot(task, results, results_dir / f"{task}.png")
    seconds = sum(r["seconds"] for r in results if r["task"] == task)
    summary.append(f"### {task} ({seconds / 60:.1f} min)\n\nexact match\n\n{table(task, results, 'accuracy')}\n\n"
                   f"answer-token accuracy\n\n{table(task, results, 'token_accuracy')}\n")
  (results_dir / "summary.md").write_text("\n".join(summary))
  print("\n".join(summary))


if __name__ == "__main__":
  app.run(main)
