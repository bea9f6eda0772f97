"""``jaxlab.merge``: a zoo of jaxlab runs (and Hugging Face checkpoints) in, a jaxlab run out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.growth.trees import by_name
from jaxlab.interop.hf import export_llama, load_llama, load_mixtral
from jaxlab.train import Trainer, load_config_module, train_to_end
from jaxlab.train.build import build_run
from jaxlab.train.merge import Input, merge_and_report
from jaxlab.train.state import model_graphdef

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("arithmetic", "python_docs")  # fine-tuned on; python_stdlib is scored too


def tiny_merge_config(**merge):
  config = load_config_module(ROOT / "experiments/configs/merge_small.py").get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
  config.data.update(seq_len=32, batch_size=4, domain_max_bytes=20_000, arithmetic=dict(num_problems=2_000))
  config.train.update(steps=2, eval_every=2, checkpoint_every=2, num_samples=0, eval_batches=1)
  config.optim.warmup_steps = 0
  config.merge.update(search_batches=1, statistics_batches=2, **merge)
  return config


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """A base run on both domains and one fine-tune of it per domain (``init.start_from``)."""
  root = tmp_path_factory.mktemp("zoo")
  train_to_end(tiny_merge_config(), root / "base")
  for domain in DOMAINS:
    config = tiny_merge_config()
    config.init.start_from = str(root / "base")
    config.data.domain_weights = {d: float(d == domain) for d in config.data.domains}
    config.optim.learning_rate = 1e-2
    train_to_end(config, root / domain)
  return root


def inputs(zoo):
  return ",".join(str(zoo / d) for d in DOMAINS)


def loaded(workdir: Path):
  """A run's newest parameters and model state (`jaxlab.train.merge.Input`)."""
  config = tiny_merge_config()
  config.model.update(json.loads((workdir / "config.json").read_text())["model"])
  setup = build_run(config)
  return Input(str(workdir)).load(setup.mesh, setup.rules)


def params_of(workdir: Path):
  return loaded(workdir).params


def test_a_fine_tune_starts_from_its_source(zoo):
  base, tuned = params_of(zoo / "base"), params_of(zoo / "arithmetic")
  differences = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(tuned))]
  assert 0 < max(differences) < 0.1  # two steps from the base, not a fresh init
  init = json.loads((zoo / "arithmetic" / "init.json").read_text())
  assert init == {"start_from": str(zoo / "base"), "source_step": 2}


def test_merge_cli_writes_a_run_that_main_resumes_and_export_llama_writes(zoo, tmp_path):
  out = tmp_path / "merged"
  cmd = [sys.executable, "-m", "jaxlab.merge", f"--config={ROOT}/experiments/configs/merge_small.py",
         f"--config.merge.inputs={inputs(zoo)}", "--config.merge.method=linear", f"--workdir={out}",
         "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.mlp_dim=64", "--config.data.seq_len=32",
         "--config.data.batch_size=4", "--config.data.domain_max_bytes=20000",
         "--config.data.arithmetic.num_problems=2000", "--config.train.eval_batches=2",
         "--config.merge.search_batches=1", f"--config.merge.export={tmp_path / 'hf'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "merge.json").read_text())
  assert set(report["inputs"]) == {str(zoo / d) for d in DOMAINS}
  for metrics in (*report["inputs"].values(), report["output"], report["output_search"]):
    assert set(metrics) >= {"arithmetic/loss", "python_docs/accuracy", "mean/loss", "mean/accuracy"}
    assert all(np.isfinite(v) for v in metrics.values())
  merged = params_of(out)
  sources = [by_name(params_of(zoo / d)) for d in DOMAINS]
  for name, value in by_name(merged).items():  # the checkpoint is the uniform average
    np.testing.assert_allclose(value, (sources[0][name] + sources[1][name]) / 2, rtol=1e-6, atol=1e-7)
  model, config = load_llama(tmp_path / "hf")
  chex.assert_trees_all_close(by_name(nnx.state(model, nnx.Param)), by_name(merged), atol=1e-6)
  # jaxlab.main's config of a workdir resumes the merge's run from its step-0 checkpoint.
  config = load_config_module(ROOT / "experiments/configs/from_workdir.py").get_config(str(out))
  config.train.update(steps=1, eval_every=1)
  config.optim.warmup_steps = 0
  summary = Trainer(config, out).run()
  assert summary["start_step"] == 0 and summary["final_step"] == 1


def test_mixture_is_an_moe_run_and_exports_as_mixtral(zoo, tmp_path):
  report = merge_and_report(tiny_merge_config(inputs=inputs(zoo), method="mixture", export=str(tmp_path / "hf")),
                            tmp_path / "mixture")
  assert "model.moe_num_experts: 8 -> 2" in report["model_changes"]
  written = json.loads((tmp_path / "mixture" / "config.json").read_text())["model"]
  assert written["ffns"] == ["moe", "moe"] and written["moe_top_k"] == 1
  model, config = load_mixtral(tmp_path / "hf")
  experts = nnx.state(model, nnx.Param)["blocks"][1]["ffn"]["experts"]["up"].get_value()
  for e, domain in enumerate(DOMAINS):  # expert e is source e's MLP
    np.testing.assert_allclose(experts[e], by_name(params_of(zoo / domain))["blocks/1/ffn/up/kernel"], atol=1e-6)


def test_a_model_level_mixture_is_a_run_of_the_sources_blocks(zoo, tmp_path):
  with pytest.raises(ValueError, match=r"merge.level='model'.*drop merge.export"):
    merge_and_report(tiny_merge_config(inputs=inputs(zoo), method="mixture", level="model", export="x"), tmp_path / "x")
  report = merge_and_report(tiny_merge_config(inputs=inputs(zoo), method="mixture", level="model", dense_layers=1),
                            tmp_path / "blocks")
  assert "model.block_experts: 0 -> 2" in report["model_changes"] and np.isfinite(report["output"]["mean/loss"])
  written = json.loads((tmp_path / "blocks" / "config.json").read_text())["model"]
  assert written["block_router"] == "model" and written["block_dense_layers"] == 1
  params = by_name(params_of(tmp_path / "blocks"))
  assert "block_router/kernel" in params
  for e, domain in enumerate(DOMAINS):  # expert block e of layer 1 is source e's block 1
    source = by_name(params_of(zoo / domain))
    for name, value in source.items():
      if name.startswith("blocks/1/"):
        np.testing.assert_allclose(params[name.replace("blocks/1/", f"blocks/1/experts/{e}/")], value, atol=1e-6)


def test_model_glue_clusters_then_mixes(zoo, tmp_path):
  config = tiny_merge_config(inputs=inputs(zoo), base=str(zoo / "base"), method="model_glue", threshold=0.999)
  report = merge_and_report(config, tmp_path / "glue")
  assert report["families"] == [[0], [1]] and report["members"] == [[0], [1]]
  sims = np.asarray(report["similarities"])
  assert sims.shape == (2, 2) and np.allclose(np.diag(sims), 1.0) and sims[0, 1] < 0.999
  assert "model.moe_num_experts: 8 -> 2" in report["model_changes"]  # two families: mixed as experts


def test_a_model_of_another_width_or_method_is_refused(zoo, tmp_path):
  other = tmp_path / "wide"
  other.mkdir()
  written = json.loads((zoo / "python_docs" / "config.json").read_text())
  written["model"]["d_model"] = 48
  (other / "config.json").write_text(json.dumps(written))
  os.symlink(zoo / "python_docs" / "checkpoints", other / "checkpoints")
  with pytest.raises(ValueError, match=r"model.d_model: 32 -> 48"):
    merge_and_report(tiny_merge_config(inputs=f"{zoo / 'arithmetic'},{other}"), tmp_path / "out")
  with pytest.raises(ValueError, match="merge.method='soup' is not supported; use one of"):
    merge_and_report(tiny_merge_config(inputs=inputs(zoo), method="soup"), tmp_path / "out")
  with pytest.raises(ValueError, match="merge.input_domains has 1 entries for 2 inputs"):
    merge_and_report(tiny_merge_config(inputs=inputs(zoo), input_domains="arithmetic"), tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="neither a jaxlab workdir"):
    merge_and_report(tiny_merge_config(inputs=str(tmp_path)), tmp_path / "out")
  config = tiny_merge_config()
  config.model.d_model = 48
  config.init.start_from = str(zoo / "base")
  with pytest.raises(ValueError, match=r"(?s)init.start_from=.* is a run of another model.*model.d_model: 32 -> 48"):
    Trainer(config, tmp_path / "start")
  assert not (tmp_path / "out").exists()


def test_hugging_face_llama_checkpoints_are_inputs(zoo, tmp_path):
  for domain in DOMAINS:
    run = loaded(zoo / domain)
    export_llama(nnx.merge(model_graphdef(run.config), run.params, run.model_state), run.config, tmp_path / domain)
  config = tiny_merge_config(inputs=",".join(str(tmp_path / d) for d in DOMAINS), method="linear")
  merge_and_report(config, tmp_path / "merged")
  sources = [by_name(params_of(zoo / d)) for d in DOMAINS]
  for name, value in by_name(params_of(tmp_path / "merged")).items():
    np.testing.assert_allclose(value, (sources[0][name] + sources[1][name]) / 2, rtol=1e-5, atol=1e-6)
