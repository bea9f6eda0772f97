"""The whole run: artifacts, exact resume after SIGTERM, NaN stops, checkpoint checks."""

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
from jaxlab.train import NonFiniteLossError, Trainer, report, train_and_report
from jaxlab.train.checkpoint import CheckpointMismatchError, restore_target
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
  assert proc.returncode == 0, output
  stopped_at = max(losses(interrupted))
  assert 10 <= stopped_at < 300, "the run was not interrupted"
  checkpoints = [int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit()]
  assert checkpoints == [stopped_at]

  resumed = subprocess.run(_main(interrupted, *overrides), cwd=REPO, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  uninterrupted = tmp_path / "uninterrupted"
  full = subprocess.run(_main(uninterrupted, *overrides), cwd=REPO, capture_output=True, text=True)
  assert full.returncode == 0, full.stderr

  after, reference = losses(interrupted), losses(uninterrupted)
  assert sorted(after) == list(range(1, 301))  # one record per step, none duplicated
  np.testing.assert_allclose([after[s] for s in range(1, 301)], [reference[s] for s in range(1, 301)],
                             rtol=1e-6)


def _poison_batch(monkeypatch, at_batch):
  """Batches from ``at_batch`` on carry NaN weights, as corrupt data would."""
  original = data_lib.train_dataset

  def poisoned(source, global_batch, seed, process=None):
    def poison(index, batch):
      if index >= at_batch:
        batch = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
      return batch

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None).batch(global_batch)
    return ds.map_with_index(poison).to_iter_dataset()

  assert original is not None
  monkeypatch.setattr(data_lib, "train_dataset", poisoned)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  _poison_batch(monkeypatch, at_batch=4)  # step 5 sees NaN
  tiny_config.train.update(steps=8, checkpoint_every=2, eval_every=100)
  trainer = Trainer(tiny_config, tmp_path)
  with pytest.raises(NonFiniteLossError, match="at step 5"):
    trainer.run()
  assert trainer.checkpointer.latest_step() == 4
  restored = Trainer(tiny_config, tmp_path).restore_or_init(iter(data_lib.train_dataset(
      trainer.sources.train, 8, 0)))
  assert int(restored.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_nonfinite_parameters_are_never_checkpointed(tiny_config, tmp_path):
  tiny_config.optim.learning_rate = float("nan")
  tiny_config.train.update(steps=4, checkpoint_every=1)
  trainer = Trainer(tiny_config, tmp_path)
  with pytest.raises(NonFiniteLossError, match="parameters are not finite at step 1"):
    trainer.run()
  assert trainer.checkpointer.latest_step() is None


def test_checkpoint_of_another_model_is_refused_by_name(tiny_config, tmp_path):
  tiny_config.train.update(steps=3, checkpoint_every=3, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  tiny_config.model.d_model = 48
  tiny_config.train.steps = 4
  with pytest.raises(CheckpointMismatchError, match=r"params/embed/table: checkpoint \(264, 32\) vs config \(264, 48\)"):
    Trainer(tiny_config, tmp_path).run()


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tiny_config, tmp_path):
  tiny_config.train.update(steps=3, checkpoint_every=3, num_samples=0)
  Trainer(tiny_config, tmp_path).run()
  state_dir = tmp_path / "checkpoints" / "3" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  tiny_config.train.steps = 4
  with pytest.raises((CheckpointMismatchError, RuntimeError), match="checkpoints/3"):
    Trainer(tiny_config, tmp_path).run()


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
