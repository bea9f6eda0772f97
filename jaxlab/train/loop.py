"""The training loop: sharded state, grain data, metrics, eval, checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm import tqdm

from jaxlab import data as data_lib
from jaxlab.nn import generate
from jaxlab.sharding import use_mesh
from jaxlab.train import report
from jaxlab.train.build import build_run
from jaxlab.train.checkpoint import Checkpointer, restore_target
from jaxlab.train.flops import peak_flops, train_flops_per_token
from jaxlab.train.init import check_init, initial_state
from jaxlab.train.metrics import MetricsWriter
from jaxlab.train.preemption import StopRequest
from jaxlab.train.state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss, gradient or update stopped being finite; the step was not applied and no
  checkpoint holds a non-finite state."""


NONFINITE_CHECKS = (("train loss", "loss"), ("gradient norm", "grad_norm"), ("update norm", "update_norm"))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


MODEL_KEYS = ("inputs", "targets", "weights")  # the batch fields the steps read, each [batch, seq_len]


def _global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """The model's fields of a host batch as global arrays; the rest (a record's ``domain``) stays here."""
  return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in MODEL_KEYS}


def _fetch(tree: Any) -> Any:
  """Host copies of (possibly multi-host) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class _MetricsQueue:
  """Train metrics fetched one step late, so the host never stalls the device queue;
  each fetched loss is checked before the record is written."""

  def __init__(self, writer: MetricsWriter, tokens_per_step: int, *, flops_per_step: float,
               peak_flops: float, nonfinite: Callable[[str, int], Exception]):
    self.writer, self.tokens_per_step = writer, tokens_per_step
    self.flops_per_step, self.peak_flops, self.nonfinite = flops_per_step, peak_flops, nonfinite
    self.pending: list[tuple[int, Any]] = []
    self.last_time = time.perf_counter()
    self.last_loss: float | None = None

  def push(self, step: int, metrics: Any) -> None:
    self.pending.append((step, metrics))

  def flush(self, bar: tqdm) -> None:
    if not self.pending:
      return
    values = _fetch([m for _, m in self.pending])
    now = time.perf_counter()
    seconds = (now - self.last_time) / len(self.pending)
    self.last_time = now
    for (step, _), metrics in zip(self.pending, values):
      if not metrics["finite"]:
        bad = [f"{name} is {float(metrics[key])}" for name, key in NONFINITE_CHECKS
               if not np.isfinite(metrics[key])]
        raise self.nonfinite(", ".join(bad), step)
      loss = float(metrics["loss"])
      self.writer.write(step, {
          **{f"train/{key}": float(value) for key, value in metrics.items() if key != "finite"},
          "train/tokens_per_second": self.tokens_per_step / seconds,
          "train/mfu": self.flops_per_step / seconds / self.peak_flops,
          "train/step_seconds": seconds,
      })
      self.last_loss = loss
    self.pending.clear()
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / seconds:,.0f}",
                    mfu=f"{self.flops_per_step / seconds / self.peak_flops:.1%}")


class Trainer:
  """Everything a run needs, built from a ConfigDict; `run` trains to ``train.steps``."""

  def __init__(
      self, config: ml_collections.ConfigDict, workdir: str | Path,
      devices: list[jax.Device] | None = None,
  ):
    setup = build_run(config, devices)  # every config check runs before anything is written
    self.config, self.setup = config, setup
    self.workdir = Path(workdir)
    self.model_config, self.mesh, self.rules = setup.model_config, setup.mesh, setup.rules
    self.abstract, self.shardings, self.graphdef = setup.abstract, setup.shardings, setup.graphdef
    self.batch_sharding, self.train_step, self.eval_step = setup.batch_sharding, setup.train_step, setup.eval_step
    self.sources = data_lib.make_sources(config.data, config.seed)
    if self.sources.vocab_size > self.model_config.vocab_size:
      raise ValueError(
          f"model.vocab_size={self.model_config.vocab_size} is smaller than the data's "
          f"{self.sources.vocab_size} token ids; set model.vocab_size >= {self.sources.vocab_size}."
      )
    self.train_data = data_lib.train_dataset(self.sources.train, config.data.batch_size, config.seed)
    # Raises now, before the checkpoint directory exists, if the validation split is too small.
    data_lib.eval_batches(self.sources.validation, config.data.batch_size, config.train.eval_batches)
    for name, domain in self.sources.domains.items():
      data_lib.eval_batches(domain.validation, config.data.batch_size, config.train.eval_batches,
                            name=f"the validation split of domain {name!r}")
    resuming = any(p.name.isdigit() for p in (self.workdir / "checkpoints").glob("*"))
    self.source = None if resuming else check_init(config, self.model_config)  # the run this one starts from
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=config.train.keep_checkpoints)

  def init_state(self, data_iterator=None) -> TrainState:
    """The initial state (`jaxlab.train.init`); how it was made goes to ``init.json``.
    LiGO's operator training draws its batches from ``data_iterator``."""
    batches = None if data_iterator is None else (
        _global_batch(next(data_iterator), self.batch_sharding) for _ in itertools.count())
    state, report = initial_state(self.setup, self.source, batches)
    if "ligo_steps" in report:  # each operator step runs the large model forward and backward
      tokens = self.config.data.batch_size * self.config.data.seq_len
      report["ligo_flops"] = report["ligo_steps"] * tokens * train_flops_per_token(
          self.abstract.params, self.model_config, self.config.data.seq_len)
    if report and jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "init.json").write_text(json.dumps(report, indent=2))
    return state

  def restore_or_init(self, data_iterator) -> TrainState:
    """The newest intact checkpoint's state (and data position), else the initial state
    (fresh, or from the run ``init`` names)."""
    target = restore_target(self.abstract, self.shardings)
    step, state = self.checkpointer.restore_newest_intact(target, data_iterator)
    if step is None:
      return self.init_state(data_iterator)
    log.info("resuming from %s step %d", self.checkpointer.directory, step)
    return state

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """``eval/...`` on the validation split, then ``eval/<domain>/...`` on each domain's."""
    metrics = {f"eval/{k}": v for k, v in self.evaluate_source(state, self.sources.validation).items()}
    for name, domain in self.sources.domains.items():
      metrics.update({f"eval/{name}/{k}": v for k, v in self.evaluate_source(state, domain.validation).items()})
    return metrics

  def evaluate_source(self, state: TrainState, source: Any) -> dict[str, float]:
    """Weighted loss, perplexity and accuracy (and the mean attention-sink measures) over
    the first ``train.eval_batches`` batches of ``source``."""
    batches = data_lib.eval_batches(source, self.config.data.batch_size, self.config.train.eval_batches)
    sums, count = None, 0
    with use_mesh(self.mesh, self.rules):
      for batch in batches:
        out = self.eval_step(state, _global_batch(batch, self.batch_sharding))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        count += 1
    sums = _fetch(sums)
    loss = float(sums["loss_sum"] / max(sums["weight_sum"], 1.0))
    sinks = {k: float(v) / count for k, v in sums.items() if k.startswith("attention_sink")}
    return {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        "accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0)),
        **sinks,
    }

  def _stop_error(self, what: str, step: int) -> NonFiniteLossError:
    latest = self.checkpointer.latest_step()
    if latest is None:
      kept = "No checkpoint was written before it, so a rerun starts from scratch."
    else:
      kept = (f"The newest checkpoint, step {latest} (written from a finite state), is kept in "
              f"{self.checkpointer.directory}; a rerun resumes from it.")
    return NonFiniteLossError(
        f"{what} at step {step}; that step's update was not applied and the run stops without "
        f"saving. {kept} Lower optim.learning_rate or optim.clip_norm, or check the data, "
        "before rerunning."
    )

  def run(self) -> dict[str, Any]:
    """Trains from the latest checkpoint (or from scratch) to ``train.steps``."""
    config, train = self.config, self.config.train
    self.workdir.mkdir(parents=True, exist_ok=True)
    data_iterator = iter(self.train_data)
    state = self.restore_or_init(data_iterator)
    start = int(_fetch(state.step))
    if jax.process_index() == 0:
      (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = MetricsWriter(self.workdir, start)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    queue = _MetricsQueue(
        writer, tokens_per_step,
        flops_per_step=tokens_per_step * train_flops_per_token(
            self.abstract.params, self.model_config, config.data.seq_len),
        peak_flops=peak_flops(list(self.mesh.devices.flat)),
        nonfinite=self._stop_error,
    )
    summary: dict[str, Any] = {"start_step": start, "preempted": False}
    bar = tqdm(total=train.steps, initial=start, desc="train", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    try:
      with StopRequest() as stop, use_mesh(self.mesh, self.rules):
        for step in range(start + 1, train.steps + 1):
          batch = _global_batch(next(data_iterator), self.batch_sharding)
          state, metrics = self.train_step(state, batch)
          queue.flush(bar)  # the previous step's metrics, while this step runs
          queue.push(step, metrics)
          bar.update(1)
          last, stopping = step == train.steps, stop.requested()
          if step % train.checkpoint_every == 0 or last or stopping:
            queue.flush(bar)  # never checkpoint a state whose step was not checked
            if not bool(_fetch(_all_finite((state.params, state.opt_state)))):
              raise self._stop_error("the parameters or optimizer state are not finite", step)
            self.checkpointer.save(step, state, data_iterator)
          if step % train.eval_every == 0 or last:
            queue.flush(bar)
            eval_metrics = self.evaluate(state)
            writer.write(step, eval_metrics)
            summary.update(eval_metrics)
          if stopping:
            summary["preempted"] = True
            log.warning("stop requested: saved checkpoint at step %d, exiting", step)
            break
        queue.flush(bar)
    finally:
      bar.close()
      self.checkpointer.close()
      writer.close()
    summary["final_step"] = int(_fetch(state.step))
    summary["last_train_loss"] = queue.last_loss
    self.state = state
    return summary

  def write_report(self, summary: dict[str, Any]) -> None:
    """``summary.json`` (the run's summary, see `train_and_report`); after a finished run
    also the loss plot and, for text data, sample continuations of validation prompts."""
    if not summary["preempted"] and self.sources.tokenizer is not None:
      summary["unigram_entropy"] = report.unigram_entropy(self.sources.train.tokens)
    if jax.process_index() == 0:
      (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["preempted"]:
      return
    if jax.process_index() == 0:
      report.plot_losses(self.workdir / "metrics.jsonl", self.workdir / "loss.png",
                         summary.get("unigram_entropy"))
    if self.config.train.num_samples and self.sources.tokenizer is not None:
      self.write_samples(self.config.train.num_samples, self.config.train.sample_tokens)

  def write_samples(self, num_samples: int, sample_tokens: int) -> None:
    """Continues the openings of validation documents (temperature 0.8, top-k 40),
    staying inside the trained context length."""
    tokenizer, seq_len = self.sources.tokenizer, self.config.data.seq_len
    prompt_len = seq_len // 4
    stream = self.sources.validation.tokens
    starts = [i + 1 for i in np.flatnonzero(stream == tokenizer.eos_id) if i + 1 + prompt_len < len(stream)]
    starts = (starts + list(range(0, len(stream) - prompt_len, prompt_len)))[:num_samples]
    prompts = np.stack([stream[s : s + prompt_len] for s in starts])
    model = nnx.merge(self.graphdef, self.state.params, self.state.model_state)
    with use_mesh(self.mesh, self.rules):
      tokens = generate(model, prompts, min(sample_tokens, seq_len - prompt_len), temperature=0.8,
                        top_k=40, rng=jax.random.key(self.config.seed))
    tokens = _fetch(tokens)
    if jax.process_index() == 0:
      text = [f"--- prompt ---\n{tokenizer.decode(p)}\n--- continuation ---\n{tokenizer.decode(c)}\n"
              for p, c in zip(prompts, tokens)]
      (self.workdir / "samples.txt").write_text("\n".join(text))


class RunPreempted(RuntimeError):
  """A run stopped on a signal (after its checkpoint) before ``train.steps``."""


def train_to_end(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[Trainer, dict[str, Any]]:
  """A run trained to ``train.steps`` and its summary. Raises RunPreempted when a signal
  stopped it, so that a study stops too instead of going on to its next run (rerun it to
  resume from the checkpoint)."""
  trainer = Trainer(config, workdir)
  summary = trainer.run()
  if summary["preempted"]:
    raise RunPreempted(f"the run in {workdir} was stopped at step {summary['final_step']}; rerun to resume")
  return trainer, summary


def train_and_report(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains, then writes the report. The summary (also ``summary.json``) holds
  ``start_step``, ``final_step``, ``preempted`` (a signal stopped the run after a
  checkpoint), ``last_train_loss``, the last eval metrics and, for text data after a
  finished run, ``unigram_entropy`` (nats per token of the best context-free model)."""
  trainer = Trainer(config, workdir)
  summary = trainer.run()
  trainer.write_report(summary)
  return summary
