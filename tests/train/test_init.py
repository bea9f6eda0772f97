"""Starting a run from another run's checkpoint: ``init.start_from``, ``init.upcycle_from`` and
``init.grow_from``."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxlab import data as data_lib
from jaxlab.growth.trees import by_name
from jaxlab.train import Trainer, load_config_module
from jaxlab.train.init import check_fine_tuning
from jaxlab.train.metrics import read_metrics


def train_steps_from_the_source_loss(source, run):
  """Asserts that ``run``'s first training loss is the ``source`` model's loss on that
  batch (the started model computes the source's function); returns the logged steps."""
  config = run.config
  first = next(iter(data_lib.train_dataset(run.sources.train, config.data.batch_size, config.seed)))
  sums = source.eval_step(source.state, {k: first[k] for k in ("inputs", "targets", "weights")})
  records = [r for r in read_metrics(run.workdir / "metrics.jsonl") if "train/loss" in r]
  assert records[0]["train/loss"] == pytest.approx(float(sums["loss_sum"] / sums["weight_sum"]), rel=1e-5)
  return [r["step"] for r in records]


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
  assert train_steps_from_the_source_loss(dense, moe) == [1, 2]
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


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A two-step lm_tiny run that the growth tests grow (read-only)."""
  config = load_config_module(Path(__file__).resolve().parents[2] / "experiments/configs/lm_tiny.py").get_config()
  config.train.update(steps=2, checkpoint_every=2, eval_every=2, num_samples=0)
  config.optim.warmup_steps = 1
  trainer = Trainer(config, tmp_path_factory.mktemp("small"))
  trainer.run()
  return trainer


def test_a_run_grown_by_identity_insertion_starts_at_the_small_models_loss_and_resumes_without_it(
    small, tmp_path):
  shutil.copytree(small.workdir, tmp_path / "small")
  tiny_config = small.config
  deep = tiny_config.copy_and_resolve_references()
  deep.model.num_layers = 2 * tiny_config.model.num_layers
  deep.init.update(grow_from=str(tmp_path / "small"), operator="identity")
  grown = Trainer(deep, tmp_path / "deep")
  grown.run()
  assert train_steps_from_the_source_loss(small, grown) == [1, 2]  # step 0 again, a fresh optimizer
  assert int(grown.state.opt_state[1][0].count) == 2
  report = json.loads((tmp_path / "deep" / "init.json").read_text())
  assert report["operator"] == "identity" and report["source_step"] == 2
  shutil.rmtree(tmp_path / "small")
  assert Trainer(deep, tmp_path / "deep").source is None


def test_a_ligo_run_trains_its_operator_then_continues_as_a_plain_run(small, tmp_path):
  tiny_config = small.config
  large = tiny_config.copy_and_resolve_references()
  large.model.update(num_layers=tiny_config.model.num_layers + 1, d_model=2 * tiny_config.model.d_model,
                     num_heads=2 * tiny_config.model.num_heads, mlp_dim=2 * tiny_config.model.mlp_dim)
  large.init.update(grow_from=str(small.workdir), operator="ligo", ligo_steps=6, ligo_lr=3e-2, ligo_warmup=1)
  run = Trainer(large, tmp_path / "large")
  summary = run.run()
  report = json.loads((tmp_path / "large" / "init.json").read_text())
  assert len(report["ligo_loss"]) == 6 and report["ligo_flops"] > 0
  assert min(report["ligo_loss"][1:]) < report["ligo_loss"][0]  # the operator learned
  assert summary["final_step"] == 2
  assert list(run.state.params["blocks"][0]["mixer"]["q"]["kernel"].shape)[0] == 2 * tiny_config.model.d_model


@pytest.mark.parametrize("field, value, message", [
    ("operator", "grow_big", "operator='grow_big'"),
    ("width", "tile", "init.width='tile'"),
    ("ligo_width_init", "ones", "init.ligo_width_init='ones'"),
])
def test_bad_growth_settings_are_refused_before_anything_is_written(small, tmp_path, field, value, message):
  tiny_config = small.config
  large = tiny_config.copy_and_resolve_references()
  large.model.num_layers += 1
  large.init.update(grow_from=str(small.workdir), **{field: value})
  with pytest.raises(ValueError, match=message):
    Trainer(large, tmp_path / "large")
  assert not (tmp_path / "large").exists()
  large.init.update(**{field: tiny_config.init[field]}, upcycle_from=str(small.workdir))
  with pytest.raises(ValueError, match="set together"):
    Trainer(large, tmp_path / "large")


def test_fine_tuning_adds_lora_or_tape_and_extends_the_context_from_a_rope_run(tiny_config, tmp_path):
  """The passkey protocol's starts (``init.start_from``): a RoPE run gains LoRA adapters
  (or becomes TAPE) and computes the source's function until it trains; a LoRA run is
  merged when the next run drops its adapters; other changes are refused by name."""
  tiny_config.train.update(steps=2, checkpoint_every=2, eval_every=2, num_samples=0)
  tiny_config.optim.warmup_steps = 1
  tiny_config.model.num_kv_heads = None  # TAPE keeps features per head
  base = Trainer(tiny_config, tmp_path / "base")
  base.run()

  def started(name, **model):
    config = tiny_config.copy_and_resolve_references()
    config.model.update(model)
    config.init.start_from = str(tmp_path / "base" if name != "merged" else tmp_path / "lora")
    run = Trainer(config, tmp_path / name)
    run.run()
    return run

  lora = started("lora", lora_rank=4, lora_targets=r"mixer/(q|k|v|o)$")
  assert train_steps_from_the_source_loss(base, lora) == [1, 2]
  before, after = by_name(base.state.params), by_name(lora.state.params)
  changed = {n for n in after if n not in before or not np.array_equal(before[n], after[n])}
  assert changed == {n for n in after if "/lora/" in n} and changed  # the base stays frozen
  merged = started("merged")  # no adapters: the LoRA run's are folded into its kernels
  assert train_steps_from_the_source_loss(lora, merged) == [1, 2]
  assert train_steps_from_the_source_loss(base, started("tape", positional="tape")) == [1, 2]
  extended = dataclasses.replace(lora.model_config, rope_scaling="linear", rope_scaling_factor=2.0)
  check_fine_tuning(base.model_config, extended, "base")  # position interpolation (Chen et al. 2023)
  for field, value, message in [("positional", "alibi", "model.positional: 'rope' -> 'alibi' .only 'rope' -> 'tape'"),
                                ("mlp_dim", 48, "model.mlp_dim: .* -> 48")]:
    bad = tiny_config.copy_and_resolve_references()
    bad.model[field] = value
    bad.init.start_from = str(tmp_path / "base")
    with pytest.raises(ValueError, match=f"(?s)is a run of another model.*{message}"):
      Trainer(bad, tmp_path / "bad")
