"""The SSM recall study: multi-query associative recall with attention, Mamba, polarized
Mamba (both, one-only, zero-only), Mamba-2 and GLA at depth 2 and 4, with the recency
and over-smoothing diagnostics of Wang et al. 2025 on the trained models.

  python experiments/ssm_recall/run.py --workdir=runs/ssm_recall                     # CPU, ~45 min
  python experiments/ssm_recall/run.py --workdir=... --size=accelerator              # paper scale
  python experiments/ssm_recall/run.py --workdir=... --dt_init=zero_bias --models=mamba,mamba_both
      --results=experiments/ssm_recall/results/zero_bias                              # paper's init

Each (model, depth) trains with jaxlab's Trainer in its own workdir (the study resumes
where it stopped); results go to --results (JSON, plots, a markdown table).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlab.data.synthetic import MQAR  # noqa: E402
from jaxlab.nn.diagnostics import influence_by_distance, oversmoothing  # noqa: E402
from jaxlab.train import load_config_module, shorten, train_to_end  # noqa: E402
from jaxlab.train.evaluate import sequence_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODELS = ("attention", "mamba", "mamba_both", "mamba_one", "mamba_zero", "mamba2", "gla")
LABELS = {"attention": "attention", "mamba": "Mamba", "mamba_both": "Mamba + polarization (both)",
          "mamba_one": "Mamba + A=0 state only", "mamba_zero": "Mamba + A=-inf state only",
          "mamba2": "Mamba-2", "gla": "GLA"}
# (sequence length, key-value pairs) of the test sets, per size.
TESTS = {"cpu": ((64, 8), (128, 16), (256, 16), (256, 24), (256, 30)),
         "accelerator": ((1024, 64), (1024, 128), (1024, 256))}

_WORKDIR = flags.DEFINE_string("workdir", "runs/ssm_recall", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where tables and plots go.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "accelerator"], "Model and step budget.")
_DT_INIT = flags.DEFINE_enum("dt_init", "mamba", ["mamba", "zero_bias"],
                             "Step-size init: Mamba's, or SSM-Bottleneck's (dt bias zeroed, Δ = log 2).")
_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to compare.")
_DEPTHS = flags.DEFINE_list("depths", ["2", "4"], "Numbers of layers.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps (smoke tests).")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Test examples per setting.")


def load_config(arg: str):
  return load_config_module(REPO / "experiments" / "configs" / "ssm_recall.py").get_config(arg)


def test_set(config, seq_len: int, pairs: int, examples: int) -> MQAR:
  return MQAR(vocab_size=config.data.mqar.vocab_size, seq_len=seq_len, num_kv_pairs=pairs,
              num_examples=examples, seed=10**7 + 31 * seq_len + pairs,
              power_a=config.data.mqar.power_a, random_non_queries=config.data.mqar.random_non_queries)


def diagnose(model, config) -> dict:
  """Recency (mean |∂y_t/∂x_{t-δ}| by distance δ) and over-smoothing (per-layer mean
  pairwise cosine) on two test sequences of the longest test length."""
  t, pairs = max(TESTS[_SIZE.value])
  source = test_set(config, t, pairs, 2)
  tokens = jnp.asarray(np.stack([source[i]["inputs"] for i in range(2)]))
  recency = influence_by_distance(model, tokens, targets=(t - 1, 3 * t // 4))
  return {"recency": np.asarray(recency).tolist(), "oversmoothing": np.asarray(oversmoothing(model, tokens)).tolist()}


def run_one(name: str, depth: int, workdir: Path) -> dict:
  config = load_config(f"{name},{depth},{_SIZE.value},{_DT_INIT.value}")
  shorten(config, _STEPS.value)
  start = time.time()
  trainer, summary = train_to_end(config, workdir)
  model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.model_state)
  accuracy = {f"{t}/{k}": sequence_metrics(trainer.graphdef, trainer.state,
                                           test_set(config, t, k, _EXAMPLES.value))["token_accuracy"]
              for t, k in TESTS[_SIZE.value]}
  parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))
  return {"model": name, "depth": depth, "parameters": parameters, "steps": config.train.steps,
          "final_train_loss": summary["last_train_loss"], "seconds": time.time() - start,
          "accuracy": accuracy, **diagnose(model, config)}


def plot_accuracy(results: list[dict], out: Path) -> None:
  depths = sorted({r["depth"] for r in results})
  fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
  for ax, depth in zip(axes[0], depths):
    for r in (r for r in results if r["depth"] == depth):
      settings = list(r["accuracy"])
      ax.plot(range(len(settings)), [r["accuracy"][s] for s in settings], marker="o", ms=3, label=LABELS[r["model"]])
    ax.set_xticks(range(len(settings)), [s.replace("/", "\n") for s in settings])
    ax.set_xlabel("test length / key-value pairs")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{depth} layers")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def plot_diagnostics(results: list[dict], out: Path) -> None:
  """Recency (left: influence by distance, log scale) and over-smoothing (right: cosine
  similarity by layer), solid for depth 2 and dashed for depth 4."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  colors = dict(zip(MODELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for r in results:
    style = dict(color=colors[r["model"]], ls="-" if r["depth"] == 2 else "--", lw=1.2)
    recency = np.asarray(r["recency"])
    left.plot(np.arange(len(recency)), np.maximum(recency, 1e-12), label=f"{LABELS[r['model']]}, {r['depth']}L", **style)
    right.plot(range(len(r["oversmoothing"])), r["oversmoothing"], marker="o", ms=3, **style)
  left.set_yscale("log")
  left.set_xlabel("distance t - i")
  left.set_ylabel("|∂y_t / ∂x_i|")
  left.set_title("recency")
  right.set_xlabel("layer (0: embeddings)")
  right.set_ylabel("mean pairwise cosine similarity")
  right.set_title("over-smoothing")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  left.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def table(results: list[dict]) -> str:
  settings = list(results[0]["accuracy"])
  depths = sorted({r["depth"] for r in results})
  lines = ["| model | params (2L) | " + " | ".join(f"{d}L {s}" for d in depths for s in settings) + " |",
           "|---|---|" + "---|" * (len(depths) * len(settings))]
  for name in MODELS:
    runs = {r["depth"]: r for r in results if r["model"] == name}
    if runs:
      cells = [f"{runs[d]['accuracy'][s]:.2f}" if d in runs else "" for d in depths for s in settings]
      params = runs[min(runs)]["parameters"]
      lines.append(f"| {LABELS[name]} | {params:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def diagnostics_table(results: list[dict], distances=(16, 64, 190)) -> str:
  """Influence at each distance relative to distance 0, and cosine after each block."""
  lines = ["| model | depth | " + " | ".join(f"influence {d} / 0" for d in distances) + " | cosine after each block |",
           "|---|---|" + "---|" * (len(distances) + 1)]
  for r in sorted(results, key=lambda r: (r["depth"], MODELS.index(r["model"]))):
    recency = np.asarray(r["recency"])
    cells = [f"{recency[d] / recency[0]:.1e}" for d in distances]
    cosine = " / ".join(f"{c:.2f}" for c in r["oversmoothing"][1:])
    lines.append(f"| {LABELS[r['model']]} | {r['depth']} | " + " | ".join(cells) + f" | {cosine} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results_dir = Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  results_path = results_dir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else []
  done = {(r["model"], r["depth"]) for r in results}
  for depth in map(int, _DEPTHS.value):
    for name in _MODELS.value:
      if (name, depth) in done:
        continue
      result = run_one(name, depth, Path(_WORKDIR.value) / _DT_INIT.value / name / str(depth))
      logging.getLogger("jaxlab").warning("%s", json.dumps({k: v for k, v in result.items()
                                                              if k not in ("recency", "oversmoothing")}))
      results.append(result)
      results_path.write_text(json.dumps(results, indent=1))
  plot_accuracy(results, results_dir / "accuracy.png")
  plot_diagnostics(results, results_dir / "diagnostics.png")
  minutes = sum(r["seconds"] for r in results) / 60
  summary = (f"recall accuracy (test length / key-value pairs), {minutes:.1f} min in all\n\n{table(results)}\n\n"
             f"recency and over-smoothing\n\n{diagnostics_table(results)}\n")
  (results_dir / "summary.md").write_text(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
