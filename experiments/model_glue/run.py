"""The Model-GLUE study: from a zoo of fine-tuned models, does merging, mixing or the full
Model-GLUE pipeline beat the best single model without further training (Zhao et al.,
NeurIPS 2024 D&B: +5.61% average over the best single model of a Llama-2-7B zoo)?

  python experiments/model_glue/run.py --workdir=runs/model_glue --seeds=0,1      # CPU, ~35 min a zoo
  python experiments/model_glue/run.py --workdir=... --size=accelerator --tokenizer=ckpt/base/tokenizer.json \\
      --inputs=ckpt/a,ckpt/b,... --base=ckpt/base --input_domains=...  # Llama checkpoints

The zoo (CPU size): domains_small's 1.8M-parameter byte LM trained on its three domains
(CPython's docs: prose, the standard library: code, reversed-digit addition) for
``base_steps``, then fine-tuned on each domain alone, twice: learning rate 1e-3 with data
seed 0 and 3e-3 with seed 1, so that some models are alike (one domain) and some not.
Every arm is one ``jaxlab.merge`` run over the six fine-tuned models (``--arms``):
uniform averaging, task arithmetic, TIES, DARE (with TIES' sign election), Fisher,
RegMean, Model-GLUE's greedy merge (coefficient grid, kept at its best), mixtures with
hidden-state routers (FFN level top-1 and top-2, block and model level top-1 routed by
the first token), the top-2 FFN mixture with its routers trained briefly, and the full
pipeline (clusters by the similarity of the deltas to the base, greedy merge in each,
FFN-level mixture across). The hyperparameters
with a choice (task arithmetic's λ, TIES' λ, DARE's density) are chosen on the search
windows of the validation split; every number reported is on the disjoint report windows.
The best single model is the input with the best mean report accuracy (so the comparison
favours it). Rerunning resumes: finished runs and merges are read back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from jaxlab.train import load_config_module, train_to_end
from jaxlab.train.merge import merge_and_report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[0] / "configs"
DOMAINS = ("python_docs", "python_stdlib", "arithmetic")
SIZES = {"cpu": dict(base_steps=600, finetune_steps=200, eval_batches=12, search_batches=4)}
FINETUNES = ((1e-3, 0), (3e-3, 1))  # (learning rate, data seed offset) per domain
# name: (merge.method, {merge field: value}, {field: choices searched on the search windows})
ARMS = {
    "uniform": ("linear", {}, {}),
    "task_arithmetic": ("task_arithmetic", {}, {"scale": (0.1, 0.15, 0.2, 0.4, 0.6, 1.0)}),
    "ties": ("ties", {"density": 0.2}, {"scale": (0.25, 0.5, 1.0, 1.5)}),
    "dare_ties": ("dare_ties", {"scale": 1.0}, {"density": (0.1, 0.3, 0.5, 0.7, 0.9)}),
    "fisher": ("fisher", {}, {}),
    "regmean": ("regmean", {}, {}),
    "greedy": ("greedy", {"coefficients": "grid"}, {}),
    "mixture": ("mixture", {"router": "hidden"}, {}),
    "mixture_block": ("mixture", {"router": "hidden", "level": "block"}, {}),
    "mixture_model": ("mixture", {"router": "hidden", "level": "model"}, {}),
    "mixture_top2": ("mixture", {"router": "hidden", "top_k": 2}, {}),
    "model_glue": ("model_glue", {"threshold": 0.5}, {}),
}
# name: (the arm whose mixture is trained, {optim field: value}). Only the routers train, on the three
# domains' training data; top-2 because a renormalized top-1 gate is 1 and gives the router no gradient.
TRAINED = {"mixture_top2_trained": ("mixture_top2", dict(learning_rate=3e-3, warmup_steps=10, trainable="router"))}
ROUTER_STEPS = 100
PAPER = "+5.61% average over the best single model (Llama-2-7B zoo 'Which16', no extra training)"

_WORKDIR = flags.DEFINE_string("workdir", "runs/model_glue", "Where the zoo and the merges go.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where the tables and the picture go.")
_SIZE = flags.DEFINE_enum("size", "cpu", [*SIZES, "accelerator"], "cpu: train the zoo here; accelerator: "
                          "merge the Llama checkpoints --inputs (fine-tuned from --base).")
_ARMS = flags.DEFINE_list("arms", [*ARMS, *TRAINED], "Arms to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "cpu: one zoo per seed (the base's seed; its fine-tunes' data seeds).")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies the step counts (0.02 for a smoke run).")
_INPUTS = flags.DEFINE_list("inputs", [], "accelerator: Hugging Face Llama checkpoints to merge.")
_BASE = flags.DEFINE_string("base", None, "accelerator: the checkpoint they were fine-tuned from.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "accelerator: the checkpoints' tokenizer.json.")
_INPUT_DOMAINS = flags.DEFINE_string("input_domains", None, "accelerator: merge.input_domains.")

log = logging.getLogger("jaxlab")


def merge_config(method: str, size: dict):
  config = load_config_module(CONFIGS / "merge_small.py").get_config(method)
  config.train.eval_batches = size["eval_batches"]
  config.merge.search_batches = size["search_batches"]
  config.data.update(size.get("data", {}))
  config.mesh.update(size.get("mesh", {}))
  if _TOKENIZER.value:
    config.data.tokenizer = _TOKENIZER.value
  return config


def train_zoo(workdir: Path, size: dict, zoo_seed: int) -> tuple[str, list[str]]:
  """The base run (seed ``zoo_seed``) and the six fine-tuned runs (trained or read back)."""
  config = load_config_module(CONFIGS / "domains_small.py").get_config()
  config.seed = zoo_seed
  steps = max(2, round(size["base_steps"] * _SCALE.value))
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, num_samples=0)
  train_to_end(config, workdir / "base")
  zoo = []
  for domain in DOMAINS:
    for lr, seed in FINETUNES:
      config = load_config_module(CONFIGS / "domains_small.py").get_config()
      steps = max(2, round(size["finetune_steps"] * _SCALE.value))
      config.seed = 2 * zoo_seed + seed
      config.init.start_from = str(workdir / "base")
      config.data.domain_weights = {d: float(d == domain) for d in DOMAINS}
      config.optim.update(learning_rate=lr, warmup_steps=min(20, steps // 4))
      config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, num_samples=0)
      name = f"{domain}_lr{lr:g}_s{seed}"
      train_to_end(config, workdir / "zoo" / name)
      zoo.append(str(workdir / "zoo" / name))
  return str(workdir / "base"), zoo


def run_merge(workdir: Path, method: str, fields: dict, size: dict, inputs: list[str], base: str | None) -> dict:
  """One ``jaxlab.merge`` run, or its ``merge.json`` when it already ran."""
  if (workdir / "merge.json").is_file():
    return json.loads((workdir / "merge.json").read_text())
  config = merge_config(method, size)
  config.merge.update(inputs=",".join(inputs), base=base, input_domains=_INPUT_DOMAINS.value, **fields)
  return merge_and_report(config, workdir)


def train_routers(name: str, workdir: Path, size: dict, inputs: list[str], base: str | None) -> dict:
  """``TRAINED[name]``: its mixture arm's run with the routers trained for ``ROUTER_STEPS``
  (``init.start_from``, ``optim.trainable``), scored as a one-input merge of that run."""
  source, optim = TRAINED[name]
  mixture = run_arm(source, workdir, size, inputs, base)
  config = load_config_module(CONFIGS / "from_workdir.py").get_config(str(workdir / source))
  steps = max(2, round(ROUTER_STEPS * _SCALE.value))
  config.init.start_from = str(workdir / source)
  config.optim.update(**optim)
  config.data.domain_weights = {d: 1.0 for d in DOMAINS}
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, num_samples=0)
  train_to_end(config, workdir / f"{name}_run")
  report = run_merge(workdir / name, "linear", {}, size, [str(workdir / f"{name}_run")], None)
  return {"choice": {"router_steps": steps}, **report, "inputs": mixture["inputs"]}


def run_arm(name: str, workdir: Path, size: dict, inputs: list[str], base: str | None) -> dict:
  """The arm's report, its searched hyperparameter chosen by the mean search accuracy."""
  if name in TRAINED:
    return train_routers(name, workdir, size, inputs, base)
  method, fields, search = ARMS[name]
  if not search:
    return {"choice": {}, **run_merge(workdir / name, method, fields, size, inputs, base)}
  ((field, choices),) = search.items()
  reports = {c: run_merge(workdir / f"{name}_{field}{c:g}", method, {**fields, field: c}, size, inputs, base)
             for c in choices}
  best = max(reports, key=lambda c: reports[c]["output_search"]["mean/accuracy"])
  return {"choice": {field: best}, "searched": {f"{c:g}": r["output_search"]["mean/accuracy"]
                                                 for c, r in reports.items()}, **reports[best]}


def short(path: str) -> str:
  return Path(path).name


def similarity_picture(report: dict, names: list[str], path: Path) -> None:
  sims = np.asarray(report["similarities"])
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  image = ax.imshow(sims, cmap="viridis")
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
  families = "\n".join(" + ".join(names[i] for i in f) for f in report["families"])
  threshold = ARMS["model_glue"][1]["threshold"]
  ax.set_title(f"similarity of the deltas to the base (per-column cosine)\nfamilies at > {threshold}:\n{families}",
               fontsize=7)
  fig.colorbar(image)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summarize(results: dict, base_metrics: dict | None) -> str:
  first = next(iter(results.values()))
  inputs = first["inputs"]
  best = max(inputs, key=lambda p: inputs[p]["mean/accuracy"])
  rows = [("best single: " + short(best), inputs[best], {})]
  if base_metrics is not None:
    rows.insert(0, ("base (before fine-tuning)", base_metrics, {}))
  rows += [(name, r["output"], r["choice"]) for name, r in results.items()]
  columns = [*(f"{d}/accuracy" for d in DOMAINS), "mean/accuracy", "mean/loss"]
  lines = ["| model | " + " | ".join(columns) + " | vs best single (mean accuracy) | chosen on search windows |",
           "|---|" + "---|" * (len(columns) + 2)]
  reference = inputs[best]["mean/accuracy"]
  for name, metrics, choice in rows:
    gain = 100 * (metrics["mean/accuracy"] - reference) / reference
    lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + f" | {gain:+.2f}% | "
                 + (", ".join(f"{k}={v}" for k, v in choice.items()) or "") + " |")
  lines.append("")
  lines.append("| input | " + " | ".join(columns) + " |")
  lines.append("|---|" + "---|" * len(columns))
  for path, metrics in inputs.items():
    lines.append(f"| {short(path)} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
  lines.append(f"\nThe paper: {PAPER}.")
  return "\n".join(lines)


def run_zoo(workdir: Path, size: dict, base: str | None, inputs: list[str]) -> tuple[dict, dict | None]:
  results = {}
  for name in _ARMS.value:
    results[name] = run_arm(name, workdir / "merges", size, inputs, base)
    log.info("%s: mean accuracy %.4f", name, results[name]["output"]["mean/accuracy"])
  base_metrics = None
  if base is not None:
    base_metrics = run_merge(workdir / "merges" / "base", "linear", {}, size, [base], None)["output"]
  return results, base_metrics


def gains(results: dict) -> dict[str, float]:
  """Each arm's mean accuracy relative to the best single model's, in %."""
  inputs = next(iter(results.values()))["inputs"]
  best = max(m["mean/accuracy"] for m in inputs.values())
  return {name: 100 * (r["output"]["mean/accuracy"] - best) / best for name, r in results.items()}


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxlab").setLevel(logging.INFO)
  for name in _ARMS.value:
    if name not in ARMS and name not in TRAINED:
      raise app.UsageError(f"--arms: {name!r} is not one of {[*ARMS, *TRAINED]}")
  workdir, results_dir = Path(_WORKDIR.value), Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  if _SIZE.value == "accelerator":
    if not _INPUTS.value:
      raise app.UsageError("--size=accelerator merges --inputs (Hugging Face Llama checkpoints).")
    size = dict(eval_batches=32, search_batches=16, data=dict(seq_len=1024, batch_size=32),
                mesh=dict(data=1, fsdp=-1, tensor=1, expert=1))  # 7B parameters sharded over every chip
    zoos = {"accelerator": (workdir, _BASE.value, list(_INPUTS.value))}
  else:
    size = SIZES[_SIZE.value]
    zoos = {f"seed{s}": (workdir / f"seed{s}", *train_zoo(workdir / f"seed{s}", size, int(s))) for s in _SEEDS.value}
  tables, everything = [], {}
  for key, (zoo_dir, base, inputs) in zoos.items():
    results, base_metrics = run_zoo(zoo_dir, size, base, inputs)
    everything[key] = {"arms": results, "base": base_metrics}
    if "model_glue" in results:
      similarity_picture(results["model_glue"], [short(p) for p in inputs], results_dir / f"similarity_{key}.png")
    tables.append(f"### zoo {key}\n\n" + summarize(results, base_metrics))
  per_zoo = [gains(v["arms"]) for v in everything.values()]
  lines = ["| arm | mean accuracy vs best single, % (mean over zoos) | spread (min .. max) |", "|---|---|---|"]
  for name in _ARMS.value:
    values = [g[name] for g in per_zoo]
    lines.append(f"| {name} | {np.mean(values):+.2f} | {min(values):+.2f} .. {max(values):+.2f} |")
  table = "\n".join(lines) + "\n\n" + "\n\n".join(tables)
  suffix = "" if _SIZE.value == "cpu" else f"_{_SIZE.value}"
  (results_dir / f"results{suffix}.json").write_text(json.dumps(everything, indent=2))
  (results_dir / f"summary{suffix}.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
