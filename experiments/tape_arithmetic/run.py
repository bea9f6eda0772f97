"""The TAPE study: length generalization of reversed-digit addition and passkey
retrieval with RoPE, NoPE, ALiBi and TAPE at equal parameters and steps.

  python experiments/tape_arithmetic/run.py --workdir=runs/tape_study            # CPU
  python experiments/tape_arithmetic/run.py --workdir=... --size=accelerator     # paper scale

Tasks: ``addition_abacus`` is the paper's arithmetic protocol (Abacus digit embeddings on
every arm, operands of 1-5 digits, tested to 20); ``addition`` and ``passkey`` are the
from-scratch, zero-shot baselines. Each (task, encoding, seed) trains with jaxlab's
Trainer in its own workdir (so the study resumes where it stopped), then is scored by
exact match per length; results go to --results (JSON, plots, markdown tables).
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

from jaxlab.data.synthetic import Addition, Passkey  # noqa: E402
from jaxlab.nn import ModelConfig, parameter_count  # noqa: E402
from jaxlab.train import load_config_module, shorten, train_to_end  # noqa: E402
from jaxlab.train.evaluate import sequence_metrics  # noqa: E402
from jaxlab.train.optim import trainable_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENCODINGS = ("rope", "none", "alibi", "tape")
TASKS = {
    "addition_abacus": dict(config="tape_arithmetic", protocol="abacus", lengths=(*range(1, 13), 16, 20),
                            trained_up_to=5, examples=200, seeds=2),
    "addition": dict(config="tape_arithmetic", protocol="plain", lengths=(*range(1, 13), 16), trained_up_to=8,
                     examples=100, seeds=3),
    "passkey": dict(config="tape_passkey", protocol=None, lengths=(32, 64, 128, 256, 512), trained_up_to=64,
                    examples=100, seeds=1),
    # The paper's passkey protocol: each seed's pretrained RoPE model, then each fine-tune of it.
    "passkey_finetune": dict(config="tape_passkey", protocol="finetune", lengths=(32, 64, 128, 256, 512),
                             trained_up_to=128, examples=200, seeds=3,
                             arms=("pretrained", "rope_full", "rope_embed_norm", "tape_pe", "tape_full", "lora")),
}
# Scores beyond the trained lengths count only for runs that learned the task inside them.
IN_DISTRIBUTION_BAR = 0.9
# In the official arithmetic code TAPE's attention discards its rotated queries and keys and
# the position states never reach the hidden states (README), so its arm is NoPE + Abacus.
LABELS = {("addition_abacus", "none"): "none (= the released TAPE arithmetic code)"}

_WORKDIR = flags.DEFINE_string("workdir", "runs/tape_study", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where tables and plots go.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "accelerator"], "Model and step budget.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per encoding; default: each task's own (TASKS).")
_ENCODINGS = flags.DEFINE_list("encodings", None, "Encodings (or fine-tuning arms) to run; default: the task's.")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "Tasks to run.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps (smoke tests).")


def load_config(name: str, arg: str):
  return load_config_module(REPO / "experiments" / "configs" / f"{name}.py").get_config(arg)


def count(model_fields: dict) -> int:
  return parameter_count(ModelConfig.from_dict(model_fields))


def match_parameters(config) -> int:
  """Shrinks TAPE's MLP so that every encoding has (nearly) the same parameter count."""
  target = count({**config.model.to_dict(), "positional": "rope"})
  if config.model.positional == "tape":
    width = config.model.mlp_dim
    while count({**config.model.to_dict(), "mlp_dim": width}) > target:
      width -= 1
    config.model.mlp_dim = width
  return count(config.model.to_dict())


def arms_of(task: str) -> tuple[str, ...]:
  """The task's arms: positional encodings, or for the fine-tuning protocol its arms."""
  return TASKS[task].get("arms", ENCODINGS)


def source_at(task: str, length: int, examples: int):
  """Test examples whose operands (addition) or contexts (passkey) have this length."""
  if TASKS[task]["config"] == "tape_arithmetic":
    return Addition(min_digits=length, max_digits=length, num_examples=examples, seed=10**7 + length)
  return Passkey(min_len=length, max_len=length, num_examples=examples, seed=10**7 + length)


def fine_tuned(arm: str, seed: int, workdir: Path):
  """Seed ``seed``'s pretrained RoPE model (trained first if need be), and unless ``arm``
  is ``pretrained`` its fine-tune by ``arm``: (config, trainer, summary, seconds)."""
  pretrained_dir = workdir.parent.parent / "pretrained" / str(seed)
  config = load_config("tape_passkey", f"rope,{_SIZE.value}")
  config.seed = seed
  shorten(config, _STEPS.value)
  start = time.time()
  trainer, summary = train_to_end(config, pretrained_dir)
  if arm != "pretrained":
    config = load_config("tape_passkey", f"rope,{_SIZE.value},{arm}")
    config.seed, config.init.start_from = seed, str(pretrained_dir)
    shorten(config, _STEPS.value)
    start = time.time()
    trainer, summary = train_to_end(config, workdir)
  return config, trainer, summary, time.time() - start


def trained_size(params, trainable: str | None) -> int:
  """How many of ``params`` the optimizer trains under ``optim.trainable`` (None: all)."""
  leaves = jax.tree.leaves(params)
  labels = jax.tree.leaves(trainable_labels(trainable)(params)) if trainable else ["train"] * len(leaves)
  return sum(x.size for x, label in zip(leaves, labels) if label == "train")


def run_one(task: str, encoding: str, seed: int, workdir: Path) -> dict:
  spec = TASKS[task]
  if spec["protocol"] == "finetune":
    config, trainer, summary, seconds = fine_tuned(encoding, seed, workdir)
    extra = {"parameters": sum(x.size for x in jax.tree.leaves(trainer.state.params)),
             "trainable_parameters": trained_size(trainer.state.params, config.optim.trainable)}
  else:
    config = load_config(spec["config"], f"{encoding},{_SIZE.value},{spec['protocol'] or ''}".rstrip(","))
    config.seed = seed
    shorten(config, _STEPS.value)
    extra = {"parameters": match_parameters(config)}
    start = time.time()
    trainer, summary = train_to_end(config, workdir)
    seconds = time.time() - start
  metrics = {n: sequence_metrics(trainer.graphdef, trainer.state, source_at(task, n, spec["examples"]))
             for n in spec["lengths"]}
  return {"task": task, "encoding": encoding, "seed": seed, **extra,
          "steps": config.train.steps, "final_train_loss": summary["last_train_loss"], "seconds": seconds,
          "accuracy": {str(n): m["exact_match"] for n, m in metrics.items()},
          "token_accuracy": {str(n): m["token_accuracy"] for n, m in metrics.items()}}


def per_run_table(task: str, results: list[dict]) -> str:
  """Each run's in-distribution exact match, final loss, and its scores beyond the
  trained lengths when it reached the bar (seeds that did not learn the task say so)."""
  runs = [r for r in results if r["task"] == task]
  longer = [n for n in runs[0]["accuracy"] if int(n) > TASKS[task]["trained_up_to"]]
  lines = ["| encoding | seed | final train loss | in distribution | " + " | ".join(longer) + " |",
           "|---|---|---|---|" + "---|" * len(longer)]
  for r in sorted(runs, key=lambda r: (arms_of(task).index(r["encoding"]), r["seed"])):
    inside = in_distribution(task, r)
    cells = [f"{r['accuracy'][n]:.2f}" if inside >= IN_DISTRIBUTION_BAR else "–" for n in longer]
    lines.append(f"| {LABELS.get((task, r['encoding']), r['encoding'])} | {r['seed']} | {r['final_train_loss']:.3f} | "
                 f"{inside:.2f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(task: str, results: list[dict], out: Path) -> None:
  """Exact match (left) and token accuracy (right) against length, mean ± std over seeds."""
  spec = TASKS[task]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("accuracy", "token_accuracy")):
    for encoding in arms_of(task):
      runs = [r for r in results if r["task"] == task and r["encoding"] == encoding]
      if not runs:
        continue
      lengths = [int(n) for n in runs[0][metric]]
      values = np.array([[r[metric][str(n)] for n in lengths] for r in runs])
      ax.errorbar(lengths, values.mean(0), yerr=values.std(0) if len(runs) > 1 else None, marker="o",
                  ms=3, capsize=2, label=f"{encoding} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.axvline(spec["trained_up_to"], color="gray", ls="--", lw=1, label="longest trained")
    passkey = spec["config"] == "tape_passkey"
    ax.set_xlabel("context length (tokens)" if passkey else "operand digits")
    if passkey:
      ax.set_xscale("log", base=2)
    ax.set_ylabel("exact match" if metric == "accuracy" else "answer-token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(task)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def in_distribution(task: str, run: dict) -> float:
  """A run's exact match averaged over the lengths it was trained on."""
  return float(np.mean([v for n, v in run["accuracy"].items() if int(n) <= TASKS[task]["trained_up_to"]]))


def table(task: str, results: list[dict], metric: str) -> str:
  """Mean ± std over seeds per length; for the Abacus protocol, lengths beyond the trained
  ones only where the arm's mean in-distribution exact match reaches the bar."""
  runs = [r for r in results if r["task"] == task]
  lengths = list(runs[0][metric])
  lines = ["| encoding | params | seeds | " + " | ".join(lengths) + " |",
           "|---|---|---|" + "---|" * len(lengths)]
  for encoding in arms_of(task):
    mine = [r for r in runs if r["encoding"] == encoding]
    if not mine:
      continue
    gated = task == "addition_abacus" and np.mean([in_distribution(task, r) for r in mine]) < IN_DISTRIBUTION_BAR
    cells = []
    for n in lengths:
      values = [r[metric][n] for r in mine]
      if gated and int(n) > TASKS[task]["trained_up_to"]:
        cells.append("–")
      else:
        cells.append(f"{np.mean(values):.2f}" + (f" ± {np.std(values):.2f}" if len(mine) > 1 else ""))
    label = LABELS.get((task, encoding), encoding)
    params = f"{mine[0]['parameters']:,}"
    if "trainable_parameters" in mine[0]:
      params += f" ({mine[0]['trainable_parameters']:,} trained)"
    lines.append(f"| {label} | {params} | {len(mine)} | " + " | ".join(cells) + " |")
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
    seeds = range(TASKS[task]["seeds"] if _SEEDS.value is None else _SEEDS.value)
    for encoding in _ENCODINGS.value or arms_of(task):
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
    if not any(r["task"] == task for r in results):
      continue
    plot(task, results, results_dir / f"{task}.png")
    seconds = sum(r["seconds"] for r in results if r["task"] == task)
    summary.append(f"### {task} ({seconds / 60:.1f} min)\n\nexact match\n\n{table(task, results, 'accuracy')}\n\n"
                   f"answer-token accuracy\n\n{table(task, results, 'token_accuracy')}\n")
    if task == "addition_abacus":
      summary.append(f"exact match by run\n\n{per_run_table(task, results)}\n")
  (results_dir / "summary.md").write_text("\n".join(summary))
  print("\n".join(summary))


if __name__ == "__main__":
  app.run(main)
