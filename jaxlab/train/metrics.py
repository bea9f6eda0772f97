"""Metrics to ``metrics.jsonl`` and TensorBoard, written by the first host only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
  """Appends one JSON record per call; on resume, drops records past the resumed step
  so the file reads as one uninterrupted run."""

  def __init__(self, workdir: Path, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
