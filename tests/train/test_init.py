"""Starting a run from another run's checkpoint: ``init.upcycle_from``."""

import shutil

import pytest

from jaxlab import data as data_lib
from jaxlab.train import Trainer
from jaxlab.train.metrics import read_metrics


def test_a_moe_run_starts_from_a_dense_runs_checkpoint_and_resumes_without_it(tiny_config, tmp_path):
  tiny_config.train.update(steps=2, checkpoint_every=2, eval_every=2, num_samples=0)
  tiny_config.optim.warmup_steps = 1
  dense = Trainer(tiny_config, tmp_path / "dense")
  dense.run()
  moe_config = tiny_config.copy_and_resolve_references()
  moe_config.model.update(ffns=("mlp", "moe"), moe_num_experts=4, moe_top_k=2)
  moe_config.init.upcycle_from = str(tmp_path / "dense")
  moe = Trainer(moe_config, tmp_path / "moe")
  moe.run()
  # The MoE run's first loss is the dense model's loss on that batch: the same function.
  first = next(iter(data_lib.train_dataset(moe.sources.train, moe_config.data.batch_size, moe_config.seed)))
  sums = dense.eval_step(dense.state, {k: first[k] for k in ("inputs", "targets", "weights")})
  records = [r for r in read_metrics(tmp_path / "moe" / "metrics.jsonl") if "train/loss" in r]
  assert records[0]["train/loss"] == pytest.approx(float(sums["loss_sum"] / sums["weight_sum"]), rel=1e-5)
  assert [r["step"] for r in records] == [1, 2]
  assert int(moe.state.opt_state[1][0].count) == 4  # Adam's count carried with its moments
  bad = moe_config.copy_and_resolve_references()
  bad.model.moe_expert_dim = 16
  with pytest.raises(ValueError, match="moe_expert_dim=16"):
    Trainer(bad, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()
  shutil.rmtree(tmp_path / "dense")  # a resumed run reads its own checkpoint only
  assert Trainer(moe_config, tmp_path / "moe").source is None


def test_a_missing_source_is_refused_before_anything_is_written(tiny_config, tmp_path):
  tiny_config.init.upcycle_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="init.upcycle_from=.*has no config.json"):
    Trainer(tiny_config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
