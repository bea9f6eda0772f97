"""AdamW with linear warmup, cosine decay, global-norm clipping, no weight decay on
norms and biases, and optionally only some parameters trained (parameter-efficient
fine-tuning)."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from jaxlab.nn.lora import LORA_PARAMETERS
from jaxlab.nn.ssm import NO_WEIGHT_DECAY
from jaxlab.train.state import path_name


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then cosine decay to
  ``learning_rate * min_lr_ratio`` at ``total_steps``."""
  if optim.warmup_steps >= total_steps:
    raise ValueError(
        f"optim.warmup_steps={optim.warmup_steps} must be below train.steps={total_steps}."
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=optim.warmup_steps,
      decay_steps=total_steps,
      end_value=optim.learning_rate * optim.min_lr_ratio,
  )


def decay_mask(params: Any) -> Any:
  """Weight decay applies to matrices only: norm scales and biases (1-d) are exempt, and
  so are the SSM dynamics (A, D, step sizes; `jaxlab.nn.ssm.NO_WEIGHT_DECAY`)."""

  def decays(path, p) -> bool:
    return p.ndim > 1 and path_name(path).rsplit("/", 1)[-1] not in NO_WEIGHT_DECAY

  return jax.tree_util.tree_map_with_path(decays, params)


def trainable_labels(pattern: str) -> Any:
  """Labels 'train' for parameters whose path (e.g. 'blocks/3/tape/up') matches the
  regular expression ``pattern``, 'freeze' for the rest."""
  regex = re.compile(pattern)

  def labels(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(p) for p, _ in flat]
    if not any(regex.search(n) for n in names):
      raise ValueError(f"optim.trainable={pattern!r} matches no parameter; paths look like {names[0]!r}.")
    return jax.tree_util.tree_unflatten(treedef, ["train" if regex.search(n) else "freeze" for n in names])

  return labels


def make_optimizer(optim: Any, total_steps: int, *, lora: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on the parameters ``optim.trainable`` matches; with ``lora`` (a model with LoRA
  adapters) and no ``optim.trainable``, on the adapters only, the base frozen (Hu et al.)."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(
          schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
          weight_decay=optim.weight_decay, mask=decay_mask,
      ),
  )
  trainable = optim.get("trainable") or (LORA_PARAMETERS if lora else None)
  if trainable:
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, trainable_labels(trainable))
  return tx, schedule
