"""The whole run: artifacts, exact resume after SIGTERM, NaN stops, checkpoint checks."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from jaxlab import data as data_lib
from jaxlab.cli import EXIT_STOPPED
from jaxlab.train import NonFiniteLossError, RunPreempted, Trainer, report, train_and_report, train_to_end
from jaxlab.train import build as build_lib
from jaxlab.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError, restore_target
from jaxlab.train.optim import make_optimizer
from jaxlab.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl") if "train/loss" in r}


def test_a_run_leaves_metrics_checkpoints_plot_and_samples(tiny_config, tmp_path):
  summary = train_and_report(tiny_config, tmp_path)
  assert summary["final_step"] == 8 and not summary["preempted"]
  records = read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(1, 9))
  for r in train:
    assert np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
    assert r["train/tokens_per_second"] > 0 and 0 < r["train/mfu"] < 1
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert evals[-1]["eval/perplexity"] == pytest.approx(np.exp(evals[-1]["eval/loss"]), rel=1e-5)
  for layer in (0, 1):  # the attention-sink measure of every attention layer
    assert 0 < evals[-1][f"eval/attention_sink/layer_{layer}"] <= 1
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert (tmp_path / "samples.txt").read_text().count("--- continuation ---") == 2
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert '"d_model": 32' in (tmp_path / "config.json").read_text()


def test_only_the_last_checkpoints_are_kept(tiny_config, tmp_path):
  tiny_config.train.update(steps=8, checkpoint_every=2, keep_checkpoints=2, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8]


@pytest.mark.slow
def test_a_short_run_falls_well_below_the_unigram_entropy(tiny_config, tmp_path):
  """The main job's claim at small scale: 200 steps already beat any context-free model."""
  tiny_config.data.update(seq_len=64, batch_size=16)
  tiny_config.train.update(steps=200, eval_every=200, checkpoint_every=200, eval_batches=None,
                           num_samples=0)
  tiny_config.optim.update(learning_rate=1e-2, warmup_steps=20)
  trainer = Trainer(tiny_config, tmp_path)
  summary = trainer.run()
  entropy = report.unigram_entropy(trainer.sources.train.tokens)
  assert 3.0 < entropy < 3.5
  assert summary["eval/loss"] < entropy - 0.7, (summary["eval/loss"], entropy)


def _main(workdir, *overrides):
  return [sys.executable, "-m", "jaxlab.main", "--config=experiments/configs/lm_tiny.py",
          f"--workdir={workdir}", *overrides]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(tiny_config, tmp_path):
  overrides = ["--config.train.steps=300", "--config.train.checkpoint_every=1000",
               "--config.train.eval_every=1000", "--config.train.num_samples=0"]
  interrupted = tmp_path / "interrupted"
  proc = subprocess.Popen(_main(interrupted, *overrides), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 10):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == EXIT_STOPPED == 75, output  # schedulers tell a stopped run from a finished one
  assert json.loads((interrupted / "summary.json").read_text())["preempted"] is True
  stopped_at = max(losses(interrupted))
  assert 10 <= stopped_at < 300, "the run was not interrupted"
  checkpoints = [int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit()]
  assert checkpoints == [stopped_at]

  resumed = subprocess.run(_main(interrupted, *overrides), cwd=REPO, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert json.loads((interrupted / "summary.json").read_text())["preempted"] is False
  uninterrupted = tmp_path / "uninterrupted"
  full = subprocess.run(_main(uninterrupted, *overrides), cwd=REPO, capture_output=True, text=True)
  assert full.returncode == 0, full.stderr

  after, reference = losses(interrupted), losses(uninterrupted)
  assert sorted(after) == list(range(1, 301))  # one record per step, none duplicated
  np.testing.assert_allclose([after[s] for s in range(1, 301)], [reference[s] for s in range(1, 301)],
                             rtol=1e-6)


def _poison_batch(monkeypatch, at_batch, weight=np.nan):
  """Batches from ``at_batch`` on carry weights ``weight``: NaN, as corrupt data would."""

  def poisoned(source, global_batch, seed, process=None):
    def poison(index, batch):
      if index >= at_batch:
        batch = {**batch, "weights": np.full_like(batch["weights"], weight)}
      return batch

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None).batch(global_batch)
    return ds.map_with_index(poison).to_iter_dataset()

  monkeypatch.setattr(data_lib, "train_dataset", poisoned)


def _finite_restore(tiny_config, workdir):
  trainer = Trainer(tiny_config, workdir)
  state = trainer.restore_or_init(iter(trainer.train_data))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state.params, state.opt_state)))
  return int(state.step)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  _poison_batch(monkeypatch, at_batch=4)  # step 5 sees NaN
  tiny_config.train.update(steps=8, checkpoint_every=2, eval_every=100)
  trainer = Trainer(tiny_config, tmp_path)
  with pytest.raises(NonFiniteLossError, match=r"^train loss is nan, .* at step 5.*newest checkpoint, step 4 "):
    trainer.run()
  assert trainer.checkpointer.latest_step() == 4
  assert _finite_restore(tiny_config, tmp_path) == 4


def test_a_nan_gradient_under_a_finite_loss_stops_before_the_update(
    tiny_config, tmp_path, monkeypatch, nan_gradient_on_doubled_weights):
  """Step 5's loss is finite but its gradient NaN; the step after it is where the loss
  would turn NaN. The run stops at 5, and no checkpoint (not even step 6's) is written."""
  _poison_batch(monkeypatch, at_batch=4, weight=2.0)
  tiny_config.train.update(steps=8, checkpoint_every=1, eval_every=100)
  trainer = Trainer(tiny_config, tmp_path)
  with pytest.raises(NonFiniteLossError, match=r"^gradient norm is nan, update norm is nan at step 5"):
    trainer.run()
  assert trainer.checkpointer.all_steps() == [2, 3, 4] and _finite_restore(tiny_config, tmp_path) == 4


def test_a_nan_update_stops_the_run_and_says_no_checkpoint_exists(tiny_config, tmp_path, monkeypatch):
  """A NaN learning rate (past the config checks) makes finite gradients give NaN updates."""
  def nan_learning_rate(optim, steps, **kwargs):
    optim = optim.copy_and_resolve_references()
    optim.learning_rate = float("nan")
    return make_optimizer(optim, steps, **kwargs)

  monkeypatch.setattr(build_lib, "make_optimizer", nan_learning_rate)
  tiny_config.train.update(steps=4, checkpoint_every=1)
  trainer = Trainer(tiny_config, tmp_path)
  with pytest.raises(NonFiniteLossError,
                     match="update norm is nan at step 1.*No checkpoint was written before it, so a rerun "
                           "starts from scratch"):
    trainer.run()
  assert trainer.checkpointer.latest_step() is None


def test_checkpoint_of_another_model_is_refused_by_name(tiny_config, tmp_path):
  tiny_config.train.update(steps=3, checkpoint_every=3, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  tiny_config.model.d_model = 48
  tiny_config.train.steps = 4
  with pytest.raises(CheckpointMismatchError, match=r"params/embed/table: checkpoint \(264, 32\) vs config \(264, 48\)"):
    Trainer(tiny_config, tmp_path).run()


def _checkpoint_dirs(workdir, name="checkpoints"):
  return sorted(p.name for p in (workdir / name).iterdir() if p.name[0].isdigit())


def test_unreadable_checkpoint_is_refused_and_kept(tiny_config, tmp_path):
  tiny_config.train.update(steps=3, checkpoint_every=3, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  tiny_config.train.steps = 4
  with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint is left(.|\n)*checkpoints/3 has no readable"):
    Trainer(tiny_config, tmp_path).run()
  assert _checkpoint_dirs(tmp_path) == [] and _checkpoint_dirs(tmp_path, "refused_checkpoints") == ["3"]


def test_checkpoint_corrupted_in_place_falls_back_to_the_newest_intact_one(tiny_config, tmp_path, caplog):
  """4 KB overwritten inside the latest step's array data, same size: refused by name
  (tensorstore may fail to decode the bytes, or decode them to other values, which the
  fingerprint catches), moved aside, and the rerun resumes from the step before with the
  losses it had."""
  tiny_config.train.update(steps=8, checkpoint_every=2, eval_every=100, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  uninterrupted = losses(tmp_path)
  data_files = [p for p in (tmp_path / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  size = largest.stat().st_size
  assert size > 8192, size
  with largest.open("r+b") as f:
    f.seek(size // 2 - 2048)
    f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  assert largest.stat().st_size == size

  with caplog.at_level("WARNING"):
    summary = Trainer(tiny_config, tmp_path).run()
  assert re.search(r"checkpoints/8 (is corrupt|could not be read)", caplog.text)
  assert "refused_checkpoints/8; trying the next older checkpoint" in caplog.text
  assert summary["start_step"] == 6 and summary["final_step"] == 8
  assert _checkpoint_dirs(tmp_path, "refused_checkpoints") == ["8"] and _checkpoint_dirs(tmp_path)[-1] == "8"
  resumed = losses(tmp_path)
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [uninterrupted[s] for s in range(1, 9)],
                             rtol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("data.seq_len", 0), ("data.seq_len", -5), ("data.batch_size", 0), ("data.val_fraction", 1.0),
    ("data.source", "nope"), ("train.steps", 0), ("train.grad_accum", 0), ("train.eval_every", 0),
    ("train.eval_batches", 0), ("train.checkpoint_every", -1), ("train.keep_checkpoints", 0),
    ("train.num_samples", -1), ("train.sample_tokens", 0), ("train.compute_dtype", "fp16"),
    ("optim.learning_rate", float("nan")), ("optim.clip_norm", 0.0), ("optim.b2", 1.0),
])
def test_bad_config_is_refused_by_name_before_anything_is_written(tiny_config, tmp_path, field, value):
  section, name = field.split(".")
  tiny_config[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} ")):
    Trainer(tiny_config, workdir)
  assert not workdir.exists()


def test_restore_target_carries_the_new_shardings(tiny_config, tmp_path):
  trainer = Trainer(tiny_config, tmp_path)
  target = restore_target(trainer.abstract, trainer.shardings)
  leaves = jax.tree.leaves(target)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)


def test_vocab_smaller_than_the_data_is_an_error(tiny_config, tmp_path):
  tiny_config.model.vocab_size = 200
  with pytest.raises(ValueError, match="model.vocab_size=200 is smaller than the data's 257"):
    Trainer(tiny_config, tmp_path)


def test_mqar_trains_through_the_same_interface(tiny_config, tmp_path):
  tiny_config.data.update(source="mqar", seq_len=32, batch_size=8,
                          mqar=dict(vocab_size=64, num_kv_pairs=4, num_train=64, num_eval=16))
  tiny_config.model.vocab_size = 64
  summary = train_and_report(tiny_config, tmp_path)
  assert 0 <= summary["eval/accuracy"] <= 1
  assert not (tmp_path / "samples.txt").exists()  # MQAR tokens are not text


def test_a_domains_run_evaluates_every_domain(tiny_config, tmp_path):
  tiny_config.data.update(source="domains", domain_max_bytes=20_000, arithmetic=dict(num_problems=2_000))
  tiny_config.train.update(steps=1, eval_every=1, checkpoint_every=1, num_samples=0)
  tiny_config.optim.warmup_steps = 0
  trainer = Trainer(tiny_config, tmp_path)
  trainer.run()
  (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in r]
  for name in ("", "python_docs/", "python_stdlib/", "arithmetic/"):
    assert np.isfinite(record[f"eval/{name}loss"]) and 0 <= record[f"eval/{name}accuracy"] <= 1, name
  assert 0 < report.unigram_entropy(trainer.sources.train.tokens) < np.log(257)
  tiny_config.data.arithmetic.num_problems = 300  # about 5 validation windows, fewer than one batch
  with pytest.raises(ValueError, match="validation split of domain 'arithmetic' has 6 records, fewer than data.ba"):
    Trainer(tiny_config, tmp_path / "small")


def test_moe_run_logs_router_metrics_and_resumes_its_balancing_bias_exactly(tiny_config, tmp_path):
  """The sigmoid router's bias is non-parameter state that the train step updates: it is
  checkpointed and restored, so a run resumed halfway ends where an uninterrupted one does."""
  tiny_config.model.update(ffns=("mlp", "moe"), moe_num_experts=4, moe_expert_dim=32, moe_router="sigmoid")
  tiny_config.train.update(steps=4, checkpoint_every=2, eval_every=4, num_samples=0)
  whole = Trainer(tiny_config, tmp_path / "whole")
  whole.run()
  records = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "train/loss" in r]
  for key in ("weighted_aux_loss", "weighted_z_loss", "aux_loss", "z_loss", "router_entropy", "dropped_fraction",
              "expert_load"):
    suffix = "/max_over_mean" if key == "expert_load" else ""
    assert all(np.isfinite(r[f"train/ffn/{key}/layer_1{suffix}"]) for r in records), key
  loads = [records[-1][f"train/ffn/expert_load/layer_1/{e}"] for e in range(4)]
  assert sum(loads) == pytest.approx(1.0, rel=1e-5)
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # as if stopped after step 2's checkpoint
  resumed = Trainer(tiny_config, tmp_path / "resumed")
  resumed.run()
  assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
  bias = lambda t: np.asarray(jax.device_get(t.state.model_state["blocks"][1]["ffn"]["router"]["bias"][...]))  # noqa: E731
  np.testing.assert_array_equal(bias(resumed), bias(whole))
  assert np.any(bias(whole) != 0)


def test_train_to_end_stops_a_study_when_its_run_was_preempted(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(Trainer, "run", lambda self: {"preempted": True, "final_step": 3})
  with pytest.raises(RunPreempted, match="stopped at step 3"):
    train_to_end(tiny_config, tmp_path)
  monkeypatch.setattr(Trainer, "run", lambda self: {"preempted": False, "final_step": 8})
  assert train_to_end(tiny_config, tmp_path)[1]["final_step"] == 8
