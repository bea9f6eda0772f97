"""A merge as a run: read models, merge, mix or stack them (`jaxlab.merging`), score
them on validation data, and write the result as a jaxlab run at step 0.

Inputs (``merge.inputs``, comma-separated) are jaxlab workdirs (their newest checkpoint)
or Hugging Face Llama checkpoints (a folder with ``config.json`` and safetensors, read
with `jaxlab.interop.hf.load_llama`); all must be one model (architecture, vocabulary,
width), else the error names the fields that differ. The output workdir holds
``config.json`` (this config with the result's model), ``checkpoints/0`` (its
parameters, a fresh optimizer) and ``merge.json`` (each input's and the result's
validation metrics, and the method's choices), so that ``jaxlab.main`` resumes or
fine-tunes it (``init.start_from``) and `jaxlab.interop.hf.export_llama` (or
``export_mixtral`` for a mixture) writes it out; ``merge.export`` does the latter here.

Validation windows of each domain are split in two: the first ``merge.search_batches``
batches score the searches (greedy merging, Model-GLUE), the next ``train.eval_batches``
(None: the rest) are the reported metrics, so no reported number was selected on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlab import checks
from jaxlab import data as data_lib
from jaxlab import merging
from jaxlab.growth.trees import differing_fields
from jaxlab.interop.hf import config_from_hf, export_llama, export_mixtral, load_llama
from jaxlab.nn import ModelConfig
from jaxlab.nn.config import BLOCK_POOLERS
from jaxlab.train.checkpoint import Checkpointer
from jaxlab.train.defaults import optional
from jaxlab.train.init import SourceRun
from jaxlab.train.loop import Trainer, _global_batch

log = logging.getLogger(__name__)
PIPELINES = ("greedy", "mixture", "stack", "model_glue")
SCORES = ("accuracy", "loss")


def merge_section() -> ml_collections.ConfigDict:
  """The ``merge`` section of a merge config (a run config plus this), with defaults."""
  return ml_collections.ConfigDict(dict(
      inputs="",  # comma-separated jaxlab workdirs or Hugging Face Llama checkpoints
      base=optional(None, str),  # the model the inputs were fine-tuned from (task vectors, delta similarity)
      input_domains=optional(None, str),  # per input, '+'-joined domains ("python_docs,arithmetic+python_stdlib");
                                          # None: each workdir's trained domains (weight > 0), else all
      method="linear",  # linear | slerp | task_arithmetic | ties | dare | dare_ties | fisher | regmean
                        # | greedy | mixture | stack | model_glue
      weights=optional(None, str),  # comma-separated, one per input; None: 1 each
      t=0.5, scale=1.0, density=optional(None, float), seed=0, alpha=0.9, fisher_floor=1e-6,
      statistics_batches=8,  # per input: Fisher, RegMean and hidden-router batches of its training data
      pair_method="linear",  # greedy and model_glue: the pairwise merge
      coefficients="grid",  # grid (Model-GLUE's λ in 0.1..0.9) | soup (running average: greedy soup)
      score="accuracy",  # what the searches maximize: mean over domains of accuracy | -loss
      search_batches=4,  # validation batches per domain that score the searches (not reported)
      threshold=0.95,  # model_glue: the similarity that joins a family
      level="ffn",  # mixtures: ffn (each source's MLP an expert) | block (its blocks, a router per layer) | model
      pooler="first_token",  # block and model levels: what routes a sequence: first_token (causal) | mean
      dense_layers=0, top_k=1,  # mixtures: the first layers dense (hybrid), experts per token or sequence
      router="hidden",  # hidden (from each source's data) | random (train it after: optim.trainable)
      shared="average",  # mixtures: the non-expert parameters: average (of the inputs or families) | base
      drop=0,  # stack: layers dropped at the seam (SOLAR: 8 of 32)
      export=optional(None, str),  # also write the result as a Hugging Face checkpoint here
  ))


@dataclasses.dataclass
class Model:
  """One input: where it came from, its model, parameters and the domains it was trained on."""

  path: str
  config: ModelConfig
  params: nnx.State
  model_state: nnx.State
  domains: list[str] | None


class Window:
  """Records ``[start, stop)`` of a random-access source."""

  def __init__(self, source: Any, start: int, stop: int | None):
    self.source, self.start = source, start
    self.stop = len(source) if stop is None else min(stop, len(source))

  def __len__(self) -> int:
    return max(self.stop - self.start, 0)

  def __getitem__(self, index: int):
    return self.source[self.start + index]


def _split(config: ml_collections.ConfigDict, name: str) -> list[str]:
  value = config.merge.get(name)
  return [] if not value else [v.strip() for v in value.split(",") if v.strip()]


class Input:
  """One input, opened: its model config now, its parameters on `load` (into a run's mesh)."""

  def __init__(self, path: str, field: str = "merge.inputs"):
    self.path, folder = path, Path(path)
    self.run: SourceRun | None = None
    self.domains: list[str] | None = None
    if (folder / "checkpoints").is_dir():
      self.run = SourceRun(folder, field)  # restored (and closed) in `load`
      self.config = self.run.model_config
      data = self.run.config.data
      if data.source == "domains":
        weights = data.get("domain_weights") or {name: 1.0 for name in data.domains}
        self.domains = sorted(name for name, w in weights.items() if w > 0)
    elif (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
      self.config = config_from_hf(json.loads((folder / "config.json").read_text()))
    else:
      raise FileNotFoundError(f"{field}: {path!r} is neither a jaxlab workdir (with checkpoints/) nor a Hugging "
                              "Face checkpoint (config.json and *.safetensors).")

  def load(self, mesh, rules) -> Model:
    if self.run is not None:
      state = self.run.restore(mesh, rules)
      return Model(self.path, self.config, state.params, state.model_state, self.domains)
    model, config = load_llama(self.path)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return Model(self.path, config, params, model_state, None)


def check_same_model(models: Sequence[Input]) -> ModelConfig:
  """The zoo's one model config; raises naming what differs between the first input and another."""
  for other in models[1:]:
    differ = differing_fields(models[0].config, other.config, allowed=())
    if differ:
      raise ValueError(f"{other.path} is another model than {models[0].path}: merging needs one architecture, "
                       "vocabulary and width; these fields differ:\n  " + "\n  ".join(differ))
  return models[0].config


def check_merge_config(config: ml_collections.ConfigDict) -> None:
  m = config.merge
  if not _split(config, "inputs"):
    raise ValueError("merge.inputs is empty: give comma-separated jaxlab workdirs or Hugging Face checkpoints.")
  checks.choice("merge.method", m.method, (*merging.METHODS, *PIPELINES))
  checks.choice("merge.score", m.score, SCORES)
  if m.coefficients not in ("grid", "soup"):
    raise ValueError(f"merge.coefficients={m.coefficients!r}: 'grid' (Model-GLUE's 0.1..0.9 search) or 'soup' "
                     "(running average)")
  if m.router not in ("hidden", "random"):
    raise ValueError(f"merge.router={m.router!r}: 'hidden' (from each source's data) or 'random'")
  checks.choice("merge.level", m.level, merging.LEVELS)
  checks.choice("merge.pooler", m.pooler, BLOCK_POOLERS)
  if m.export and m.level != "ffn" and m.method in ("mixture", "model_glue"):
    raise ValueError(f"merge.export writes Llama or Mixtral checkpoints, and a mixture of whole blocks "
                     f"(merge.level={m.level!r}) is neither; drop merge.export or use merge.level='ffn'.")
  if config.data.source != "domains":
    raise ValueError(f"data.source={config.data.source!r}: a merge scores models per domain; use 'domains'.")


class Evaluator:
  """Runs a model config's eval step on the search and report windows of every domain."""

  def __init__(self, config: ml_collections.ConfigDict, model_config: ModelConfig, workdir: Path):
    run = config.copy_and_resolve_references()
    run.model.update(dataclasses.asdict(model_config))
    run.init.update(start_from=None, upcycle_from=None, grow_from=None)
    self.run, self.trainer = run, Trainer(run, workdir)
    self.fresh = self.trainer.init_state()
    search, batch = config.merge.search_batches, config.data.batch_size
    self.windows = {}
    for name, domain in self.trainer.sources.domains.items():
      report_stop = None if run.train.eval_batches is None else (search + run.train.eval_batches) * batch
      self.windows[name] = (Window(domain.validation, 0, search * batch),
                            Window(domain.validation, search * batch, report_stop))

  def state(self, params: nnx.State, model_state: nnx.State | None = None):
    shardings = self.trainer.setup.shardings
    return self.fresh.replace(params=jax.device_put(params, shardings.params),
                              model_state=jax.device_put(model_state or self.fresh.model_state,
                                                         shardings.model_state))

  def metrics(self, params: nnx.State, model_state: nnx.State | None = None, part: int = 1) -> dict[str, float]:
    """Per domain and their mean: loss and next-token accuracy (part 0: search, 1: report windows)."""
    state = self.state(params, model_state)
    out = {}
    for name, windows in self.windows.items():
      result = self.trainer.evaluate_source(state, windows[part])
      out.update({f"{name}/loss": result["loss"], f"{name}/accuracy": result["accuracy"]})
    for key in ("loss", "accuracy"):
      out[f"mean/{key}"] = float(np.mean([out[f"{n}/{key}"] for n in self.windows]))
    return out

  def score(self, metric: str):
    sign = 1.0 if metric == "accuracy" else -1.0
    return lambda params: sign * self.metrics(params, part=0)[f"mean/{metric}"]

  def token_batches(self, domains: Sequence[str], count: int) -> list[dict[str, jax.Array]]:
    """``count`` global training batches drawn evenly from ``domains``."""
    setup, size = self.trainer.setup, self.run.data.batch_size
    batches = []
    for i, name in enumerate(domains):
      share = count // len(domains) + (i < count % len(domains))
      source = self.trainer.sources.domains[name].train
      for local in data_lib.eval_batches(source, size, share, name=f"the training split of domain {name!r}"):
        batches.append(_global_batch(local, setup.batch_sharding))
    return batches


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  m = config.merge
  weights = [float(w) for w in _split(config, "weights")] or None
  return dict(weights=weights, t=m.t, scale=m.scale, density=m.density, seed=m.seed, alpha=m.alpha,
              fisher_floor=m.fisher_floor)


def _combine(config, models: list[Model], base: Model | None, evaluator: Evaluator, domains_of):
  """(parameters, model config, report) of the method."""
  m, zoo = config.merge, models[0].config
  states = [x.params for x in models]
  base_params = None if base is None else base.params
  options = _options(config)
  graphdef, model_state = evaluator.trainer.graphdef, models[0].model_state
  if m.method in merging.METHODS:
    stats = {}
    if m.method in ("fisher", "regmean"):
      batches = [evaluator.token_batches(domains_of(i), m.statistics_batches) for i in range(len(models))]
      if m.method == "fisher":
        stats["fishers"] = [merging.diagonal_fisher(graphdef, x.params, x.model_state, b, seed=m.seed)
                            for x, b in zip(models, batches)]
      else:
        stats["grams"] = [merging.input_grams(graphdef, x.params, x.model_state, b) for x, b in zip(models, batches)]
    return merging.merge(states, m.method, base_params, **options, **stats), zoo, {}
  pairwise = {k: v for k, v in options.items() if k != "weights"}
  coefficients = merging.search.COEFFICIENTS if m.coefficients == "grid" else None
  score = evaluator.score(m.score)
  if m.method == "greedy":
    state, history, members = merging.greedy_merge(states, score, coefficients=coefficients, method=m.pair_method,
                                                   base=base_params, **pairwise)
    return state, zoo, {"members": members, "history": [dataclasses.asdict(h) for h in history]}
  if m.method == "stack":
    if len(models) != 2:
      raise ValueError(f"merge.method='stack' stacks two models; merge.inputs has {len(models)}.")
    state, target = merging.stack(states[0], states[1], zoo, m.drop)
    return state, target, {"drop": m.drop}
  data = lambda members: [b["inputs"] for i in members for b in evaluator.token_batches(  # noqa: E731
      domains_of(i), max(1, m.statistics_batches // len(members)))]
  if m.method == "mixture":
    target = merging.mixture_config(zoo, len(models), level=m.level, pooler=m.pooler, dense_layers=m.dense_layers,
                                    top_k=m.top_k)
    shared = base_params if m.shared == "base" else merging.merge(states, "linear")
    routers = merging.hidden_router(graphdef, shared, model_state, [data([i]) for i in range(len(models))],
                                    level=m.level, pooler=m.pooler) if m.router == "hidden" else None
    state = merging.mix(states, zoo, target, shared=shared, routers=routers, seed=m.seed)
    return state, target, {"shared": m.shared, "router": m.router, "level": m.level}
  result = merging.model_glue(
      states, zoo, score, graphdef=graphdef, model_state=model_state,
      data=data if m.router == "hidden" else None, base=base_params, threshold=m.threshold, method=m.pair_method,
      coefficients=coefficients, level=m.level, pooler=m.pooler, dense_layers=m.dense_layers, top_k=m.top_k,
      shared=m.shared, **pairwise)
  return result.state, result.config, {
      "similarities": result.similarities.tolist(), "families": result.families, "members": result.members,
      "coefficients": result.coefficients}


def merge_and_report(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs ``config.merge`` and writes the output run; returns ``merge.json``'s content."""
  check_merge_config(config)
  workdir = Path(workdir)
  if (workdir / "checkpoints").exists():
    raise FileExistsError(f"{workdir} already holds checkpoints; merge into a new --workdir.")
  m = config.merge
  opened = [Input(p) for p in _split(config, "inputs")]
  base = None if m.base is None else Input(m.base, "merge.base")
  zoo = check_same_model(opened + ([] if base is None else [base]))
  explicit = [d.split("+") for d in _split(config, "input_domains")]
  if explicit and len(explicit) != len(opened):
    raise ValueError(f"merge.input_domains has {len(explicit)} entries for {len(opened)} inputs.")
  with tempfile.TemporaryDirectory() as scratch:
    evaluator = Evaluator(config, zoo, Path(scratch) / "zoo")
    setup = evaluator.trainer.setup
    models = [x.load(setup.mesh, setup.rules) for x in opened]
    base = None if base is None else base.load(setup.mesh, setup.rules)
    every = list(evaluator.windows)
    domains_of = lambda i: explicit[i] if explicit else (models[i].domains or every)  # noqa: E731
    inputs = {x.path: evaluator.metrics(x.params, x.model_state) for x in models}
    log.info("merging %d models with %s", len(models), m.method)
    params, target, details = _combine(config, models, base, evaluator, domains_of)
    output = evaluator if target == zoo else Evaluator(config, target, Path(scratch) / "output")
    state = output.state(params)
    report = {"method": m.method, "inputs": inputs, "output": output.metrics(params),
              "output_search": output.metrics(params, part=0), **details,
              "model_changes": differing_fields(zoo, target, allowed=())}
    for e in {id(evaluator): evaluator, id(output): output}.values():
      e.trainer.checkpointer.close()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(output.run.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=output.run.train.keep_checkpoints)
    checkpointer.save(0, state, iter(output.trainer.train_data))
    checkpointer.close()
  (workdir / "merge.json").write_text(json.dumps(report, indent=2))
  if m.export:
    model = nnx.merge(output.trainer.graphdef, state.params, state.model_state)
    (export_mixtral if "moe" in target.ffns else export_llama)(model, target, m.export)
  return report
