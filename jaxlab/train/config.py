"""Checks of a run's config sections (seed, data, optim, train), run before a run
creates anything; the model section checks itself (`jaxlab.nn.ModelConfig`)."""

from __future__ import annotations

from typing import Any

from jaxlab import checks
from jaxlab.data import check_data_config
from jaxlab.train.step import COMPUTE_DTYPES


def check_optim_config(optim: Any) -> None:
  checks.number_in("optim.learning_rate", optim.learning_rate, 0, float("inf"), closed="[)")
  checks.nonnegative_int("optim.warmup_steps", optim.warmup_steps)
  checks.number_in("optim.min_lr_ratio", optim.min_lr_ratio, 0, 1)
  checks.number_in("optim.b1", optim.b1, 0, 1, closed="[)")
  checks.number_in("optim.b2", optim.b2, 0, 1, closed="[)")
  checks.number_in("optim.eps", optim.eps, 0, float("inf"), closed="()")
  checks.number_in("optim.weight_decay", optim.weight_decay, 0, float("inf"), closed="[)")
  checks.number_in("optim.clip_norm", optim.clip_norm, 0, float("inf"), closed="()")


def check_train_config(train: Any) -> None:
  for name in ("steps", "grad_accum", "eval_every", "checkpoint_every", "keep_checkpoints", "sample_tokens"):
    checks.positive_int(f"train.{name}", train[name])
  checks.positive_int("train.eval_batches", train.eval_batches, optional=True)
  checks.nonnegative_int("train.num_samples", train.num_samples)
  checks.choice("train.compute_dtype", train.compute_dtype, COMPUTE_DTYPES)


def check_run_config(config: Any) -> None:
  """Raises ValueError naming the first bad field, its value and the fix."""
  if isinstance(config.seed, bool) or not isinstance(config.seed, int):
    raise ValueError(f"seed={config.seed!r} must be an integer.")
  check_data_config(config.data)
  check_optim_config(config.optim)
  check_train_config(config.train)
