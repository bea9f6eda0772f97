"""The base ConfigDict every experiment config starts from: every field, with defaults."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference

from jaxlab.nn import ModelConfig


def optional(default: Any, field_type: type) -> FieldReference:
  """A field that may be None yet keeps its type, so the command line can set it to a
  value (``--config.model.head_dim=64``) and back to None (``--config.model.head_dim=None``)."""
  return FieldReference(default, field_type=field_type)


def _model_fields() -> dict[str, Any]:
  """ModelConfig's fields and defaults; ``X | None`` fields become typed optionals."""
  hints = typing.get_type_hints(ModelConfig)
  fields = {}
  for field in dataclasses.fields(ModelConfig):
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) and type(None) in hint.__args__:
      (value_type,) = [t for t in hint.__args__ if t is not type(None)]
      fields[field.name] = optional(field.default, value_type)
    else:
      fields[field.name] = field.default
  return fields


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run. Fields that may be None are typed (`optional`), so every
  field can be overridden from the command line."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = _model_fields()

  config.data = dict(
      source="python_docs",  # python_docs | text | tokens | mqar | addition | passkey | domains
      paths=(),  # files or globs for `text` (UTF-8) and `tokens` (.npy / .bin)
      tokenizer="bytes",  # or the path of a Hugging Face tokenizer.json
      token_dtype="uint16",  # element type of .bin token files
      seq_len=256,
      batch_size=16,  # global, over all hosts and devices
      val_fraction=0.05,
      mqar=dict(vocab_size=8192, num_kv_pairs=16, num_train=100_000, num_eval=3_000,
                power_a=0.01, random_non_queries=True),
      addition=dict(min_digits=1, max_digits=8, num_train=1_000_000, num_eval=1_000),
      passkey=dict(min_len=32, max_len=128, digits=5, num_train=1_000_000, num_eval=500),
      # `domains`: named domains in one token space, mixed for training, evaluated one by one
      # (eval/<name>/loss, ...). A name maps to "builtin" (python_docs: CPython's docs prose,
      # python_stdlib: the standard library's *.py code, arithmetic: reversed-digit sums as text)
      # or to a glob (or tuple of globs) of text files. Domain ids follow the sorted names.
      domains=dict(python_docs="builtin", python_stdlib="builtin", arithmetic="builtin"),
      domain_weights=dict(),  # name -> weight >= 0 for every domain; empty: equal weights
      domain_max_bytes=1_000_000,  # UTF-8 bytes kept of each text domain: whole documents, the last one cut
      arithmetic=dict(min_digits=1, max_digits=5, num_problems=20_000),  # the `arithmetic` domain's lines
  )
  config.optim = dict(
      learning_rate=1e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0,
      trainable=optional(None, str),  # regex over parameter paths ('tape' for TAPE-only fine-tuning); None: all
  )
  config.train = dict(
      steps=1000,
      grad_accum=1,
      compute_dtype="float32",  # or bfloat16 (parameters stay float32)
      eval_every=100,
      eval_batches=optional(16, int),  # None: the whole validation split
      checkpoint_every=100,
      keep_checkpoints=3,
      num_samples=4,  # continuations written to samples.txt at the end (text data)
      sample_tokens=200,  # at most: prompt and continuation stay within data.seq_len
      compiled_train_step=optional(None, str),  # train_step.xla from `python -m jaxlab.compile`
  )
  config.init = dict(
      start_from=optional(None, str),  # a run's workdir (a merge's too): its latest parameters, fine-tuned here
      upcycle_from=optional(None, str),  # a dense run's workdir: its latest checkpoint upcycled into this MoE
      grow_from=optional(None, str),  # a smaller run's workdir: its latest checkpoint grown into this model
      operator="ligo",  # ligo | stack | interleave | net2net | bert2bert | aki | identity (jaxlab.growth)
      width="net2net",  # stack and interleave: net2net (function-preserving copies) | copy
      mapping="random",  # Net2Net's choice of copied units: random | cyclic (exact norms when sizes divide)
      noise=0.0,  # Net2Net's symmetry-breaking noise on new units, x each tensor's std
      ligo_steps=100,  # the operator's training steps (the official README's --max_steps 100)
      ligo_lr=2e-4,
      ligo_warmup=10,  # the released command inherits 10000 (lr never passes 2e-6 in 100 steps): set it to reproduce
      ligo_weight_decay=0.1,
      ligo_depth_init="stackbert_noisy",  # stackbert_noisy | stack | interleave
      ligo_width_init="rand",  # rand | sel_noisy | copy
      ligo_kronecker=optional(None, int),  # k: each width map C = C_outer ⊗ C_inner [k, k] (large models)
  )
  config.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  config.sharding = dict(strategy="fsdp")  # dp | fsdp | fsdp_tp | fsdp_ep | fsdp_tp_ep
  config.distributed = dict(coordinator_address="", num_processes=1, process_id=0)
  return ml_collections.ConfigDict(config)


def load_config_module(path: str | Path) -> ModuleType:
  """The experiment config file at ``path`` (``experiments/configs/*.py``) as a module:
  its ``get_config`` and whatever tables it defines."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no experiment config at {path}")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shorten(config: ml_collections.ConfigDict, steps: int | None) -> None:
  """Cuts a run to ``steps`` (a study's smoke test), evaluating and checkpointing at its
  end and warming up for at most half of it; ``None`` leaves the config as it is."""
  if steps:
    config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps)
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 2)
