"""The gated-attention study (Qiu et al. 2025, "Gated Attention for Large Language Models:
Non-linearity, Sparsity, and Attention-Sink-Free"): the same LM with no gate, the
elementwise and the headwise sigmoid gate after SDPA, at equal parameters and steps.

  python experiments/gated_attention/run.py --workdir=runs/gated_attention                  # CPU
  python experiments/gated_attention/run.py --workdir=... --size=accelerator --seeds=3

Each (gate, seed) trains with jaxlab's Trainer in its own workdir (the study resumes
where it stopped) and is measured on the held-out tokens: per layer the attention weight
on the first token (queries 1..t-1, as the paper's F-Attn before its mean over layers)
and the largest |hidden activation| after the block (M-Act); loss and perplexity at the
trained length and beyond it, as trained and with training-free NTK RoPE scaling (the
paper extends with YaRN after further training, which this study does not do).
"""

from __future__ import annotations

import dataclasses
import json
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

from jaxlab.data import make_sources  # noqa: E402
from jaxlab.nn import ModelConfig, Transformer, parameter_count  # noqa: E402
from jaxlab.train import load_config_module, shorten, train_to_end  # noqa: E402
from jaxlab.train.step import forward_with_sinks, weighted_cross_entropy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GATES = ("none", "elementwise", "headwise")
# The paper's Table 4 (15B-A2.5B MoE, 400B tokens): F-Attn and M-Act, means over layers.
PAPER = {"none": dict(first_token=0.467, max_activation=1053),
         "elementwise": dict(first_token=0.048, max_activation=94),
         "headwise": dict(first_token=0.073, max_activation=98)}

_WORKDIR = flags.DEFINE_string("workdir", "runs/gated_attention", "Where runs train and checkpoint.")
_RESULTS = flags.DEFINE_string("results", str(HERE / "results"), "Where tables and plots go.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "accelerator"], "Model and step budget.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per gate.")
_GATES = flags.DEFINE_list("gates", list(GATES), "Gates to compare.")
_LENGTHS = flags.DEFINE_list("lengths", ["1", "2", "4"], "Evaluation lengths as multiples of the trained one.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps (smoke tests).")


def count(model_fields: dict) -> int:
  return parameter_count(ModelConfig.from_dict(model_fields))


def match_parameters(config) -> int:
  """Narrows a gated model's MLP until it has no more parameters than the ungated one."""
  target = count({**config.model.to_dict(), "attention_gate": None})
  while count(config.model.to_dict()) > target:
    config.model.mlp_dim -= 1
  return count(config.model.to_dict())


def held_out(config, seq_len: int) -> dict[str, jnp.ndarray]:
  """Every held-out window of ``seq_len`` tokens, as one batch."""
  data = config.data.copy_and_resolve_references()
  data.seq_len = seq_len
  validation = make_sources(data, config.seed).validation
  records = [validation[i] for i in range(len(validation))]
  return {k: jnp.asarray(np.stack([r[k] for r in records])) for k in ("inputs", "targets", "weights")}


def measure(model: Transformer, batch: dict, chunk: int = 8) -> dict:
  """Loss and, per layer, the first-token attention weight and the largest |activation|."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def one(state, inputs, targets, weights):
    model = nnx.merge(graphdef, state)
    logits, sinks = forward_with_sinks(model, inputs)
    x, positions, pe = model.embeddings(inputs)
    peaks = [jnp.max(jnp.abs(h)) for h in model.hidden_states(x, positions, pe)[1:]]
    total, _, weight = weighted_cross_entropy(logits, {"targets": targets, "weights": weights})
    return total, weight, sinks, jnp.stack(peaks)

  total = weight = 0.0
  sinks, peaks = [], []
  n = batch["inputs"].shape[0]
  for start in range(0, n, chunk):
    part = {k: v[start : start + chunk] for k, v in batch.items()}
    t, w, s, p = one(state, part["inputs"], part["targets"], part["weights"])
    total, weight = total + float(t), weight + float(w)
    sinks.append(np.array([float(s[f"attention_sink/layer_{i}"]) for i in range(len(s))]) * part["inputs"].shape[0])
    peaks.append(np.asarray(p))
  loss = total / weight
  return {"loss": loss, "perplexity": float(np.exp(loss)), "first_token": (np.sum(sinks, 0) / n).tolist(),
          "max_activation": np.max(peaks, 0).tolist()}


def uniform_floor(seq_len: int) -> float:
  """The first-token weight of uniform causal attention over queries 1..t-1."""
  return float(np.mean(1.0 / np.arange(2, seq_len + 1)))


def with_rope_scaling(trainer, factor: float) -> Transformer:
  """The trained model with NTK-aware RoPE scaling by ``factor`` (no parameters change)."""
  config = dataclasses.replace(trainer.model_config, rope_scaling="ntk", rope_scaling_factor=factor)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, trainer.state.params, trainer.state.model_state)


def run_one(gate: str, seed: int, workdir: Path) -> dict:
  config = load_config_module(REPO / "experiments" / "configs" / "gated_attention.py").get_config(
      f"{gate},{_SIZE.value}")
  config.seed = seed
  shorten(config, _STEPS.value)
  params = match_parameters(config)
  start = time.time()
  trainer, summary = train_to_end(config, workdir)
  trained = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.model_state)
  lengths = {}
  for multiple in map(int, _LENGTHS.value):
    seq_len = config.data.seq_len * multiple
    batch = held_out(config, seq_len)
    lengths[str(seq_len)] = measure(trained, batch)
    if multiple > 1:
      lengths[str(seq_len)]["ntk_perplexity"] = measure(with_rope_scaling(trainer, multiple), batch)["perplexity"]
  return {"gate": gate, "seed": seed, "parameters": params, "mlp_dim": config.model.mlp_dim,
          "steps": config.train.steps, "trained_length": config.data.seq_len,
          "final_train_loss": summary["last_train_loss"], "seconds": time.time() - start, "lengths": lengths}


def mean_std(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.3g}" + (f" ± {values.std():.2g}" if len(values) > 1 else "")


def tables(results: list[dict]) -> str:
  trained = str(results[0]["trained_length"])
  longer = [n for n in results[0]["lengths"] if n != trained]
  layers = len(results[0]["lengths"][trained]["first_token"])
  head = (f"| gate | params | seeds | loss @{trained} | F-Attn (mean of layers) | M-Act (mean of layers) | "
          + " | ".join(f"ppl @{n} (NTK)" for n in longer) + " | paper F-Attn / M-Act |")
  lines = [head, "|" + "---|" * (6 + len(longer) + 1)]
  per_layer = ["| gate | " + " | ".join(f"F-Attn L{i}" for i in range(layers)) + " | "
               + " | ".join(f"M-Act L{i}" for i in range(layers)) + " |", "|" + "---|" * (1 + 2 * layers)]
  for gate in GATES:
    runs = [r for r in results if r["gate"] == gate]
    if not runs:
      continue
    at = [r["lengths"][trained] for r in runs]
    ppl = [f"{mean_std([r['lengths'][n]['perplexity'] for r in runs])} "
           f"({mean_std([r['lengths'][n]['ntk_perplexity'] for r in runs])})" for n in longer]
    lines.append(f"| {gate} | {runs[0]['parameters']:,} | {len(runs)} | {mean_std([m['loss'] for m in at])} | "
                 f"{mean_std([np.mean(m['first_token']) for m in at])} | "
                 f"{mean_std([np.mean(m['max_activation']) for m in at])} | " + " | ".join(ppl)
                 + f" | {PAPER[gate]['first_token']} / {PAPER[gate]['max_activation']} |")
    per_layer.append(f"| {gate} | " + " | ".join(mean_std([m["first_token"][i] for m in at]) for i in range(layers))
                     + " | " + " | ".join(mean_std([m["max_activation"][i] for m in at]) for i in range(layers))
                     + " |")
  floor = uniform_floor(int(trained))
  return ("\n".join(lines) + f"\n\nUniform causal attention would put {floor:.3f} on the first token at length "
          f"{trained}.\n\nPer layer, at the trained length:\n\n" + "\n".join(per_layer) + "\n")


def plot(results: list[dict], out: Path) -> None:
  trained = str(results[0]["trained_length"])
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric, label in zip(axes, ("first_token", "max_activation"), ("attention on the first token",
                                                                          "max |hidden activation|")):
    for gate in GATES:
      runs = [r["lengths"][trained][metric] for r in results if r["gate"] == gate]
      if runs:
        values = np.asarray(runs)
        ax.errorbar(np.arange(values.shape[1]), values.mean(0), yerr=values.std(0), marker="o", capsize=2,
                    label=f"{gate} ({len(runs)} seeds)")
    if metric == "first_token":
      ax.axhline(uniform_floor(int(trained)), color="gray", ls="--", lw=1, label="uniform attention")
    ax.set_xlabel("layer")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  results_dir = Path(_RESULTS.value)
  results_dir.mkdir(parents=True, exist_ok=True)
  results_path = results_dir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else []
  done = {(r["gate"], r["seed"]) for r in results}
  for gate in _GATES.value:
    for seed in range(_SEEDS.value):
      if (gate, seed) not in done:
        results.append(run_one(gate, seed, Path(_WORKDIR.value) / gate / str(seed)))
        results_path.write_text(json.dumps(results, indent=1))
  plot(results, results_dir / "sinks_and_activations.png")
  minutes = sum(r["seconds"] for r in results) / 60
  summary = f"### {len(results)} runs, {minutes:.1f} min\n\n" + tables(results)
  (results_dir / "summary.md").write_text(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
