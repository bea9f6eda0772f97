"""End-of-run artifacts: the loss plot and sample generations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlab.train.metrics import read_metrics  # noqa: E402


def plot_losses(metrics_path: Path, out_path: Path, unigram_entropy: float | None = None) -> None:
  """Train and eval loss (nats per token) against step."""
  records = read_metrics(metrics_path)
  train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train", lw=1)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval", ms=3)
  if unigram_entropy is not None:
    ax.axhline(unigram_entropy, color="gray", ls="--", label="unigram entropy")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the token frequency distribution: the loss of the best
  context-free predictor."""
  counts = np.bincount(np.asarray(tokens).reshape(-1))
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
