"""Checks that a config fits a mesh, run on abstract shapes before anything compiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxlab.sharding.rules import EXPERT_PARALLEL, Rules, logical_to_spec, spec_size, used_mesh_axes


def _axes_text(entry) -> str:
  axes = (entry,) if isinstance(entry, str) else tuple(entry)
  return " x ".join(axes)


def check_mesh_use(mesh: Mesh, rules: Rules, strategy: str) -> None:
  """Every mesh axis of size > 1 must be used by some rule, or its devices idle."""
  unused = [a for a, n in mesh.shape.items() if n > 1 and a not in used_mesh_axes(rules)]
  if unused:
    sizes = ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in unused)
    raise ValueError(
        f"{sizes}, but sharding.strategy={strategy!r} does not use that axis; set it to 1 "
        "or pick a strategy that uses it (fsdp_tp uses tensor)."
    )


def check_expert_axis(mesh: Mesh, strategy: str, has_moe: bool) -> None:
  """Expert-parallel strategies need an expert axis to split experts over, and experts to split."""
  if strategy not in EXPERT_PARALLEL:
    return
  if mesh.shape.get("expert", 1) == 1:
    raise ValueError(
        f"sharding.strategy={strategy!r} splits experts over the expert mesh axis, but mesh.expert=1; "
        "set mesh.expert to the number of expert-parallel shards, or use "
        f"{strategy.removesuffix('_ep')!r}.")
  if not has_moe:
    raise ValueError(
        f"sharding.strategy={strategy!r} splits the experts of MoE layers, but model.ffns has no 'moe'; "
        f"use {strategy.removesuffix('_ep')!r} (the expert axis then only splits the batch).")


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules) -> None:
  """The per-step micro-batch must split evenly over the axes `batch` maps to."""
  if grad_accum < 1 or batch_size % grad_accum:
    raise ValueError(
        f"data.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum}."
    )
  spec = logical_to_spec(("batch",), rules)
  entry, shards = spec[0], spec_size(spec, mesh.shape)[0]
  micro = batch_size // grad_accum
  if micro % shards:
    raise ValueError(
        f"data.batch_size={batch_size} / train.grad_accum={grad_accum} = {micro} examples per "
        f"micro-batch is not divisible by {_axes_text(entry)} = {shards} devices; use a "
        f"batch size that is a multiple of {shards * grad_accum}."
    )


def check_divisible(
    abstract: Any, mesh: Mesh, rules: Rules, fields: Mapping[str, list[tuple[str, int]]]
) -> None:
  """Every sharded dimension of every variable must divide by its mesh axes.

  ``fields`` maps a logical name to the config fields that set it (e.g.
  ``{"heads": [("model.num_heads", 6)]}``); the error names the field whose value is
  the offending size; all offending fields are listed, in the order of ``fields``.
  """
  bad_fields: dict[tuple[str, str], str] = {}
  bad_params: list[str] = []
  flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, var in flat:
    if not isinstance(var, nnx.Variable) or not var.get_metadata().get("out_sharding"):
      continue
    if not hasattr(var.get_value(), "shape"):  # a frozen parameter's optimizer slot (optax's MaskedNode)
      continue
    names = var.get_metadata()["out_sharding"]
    spec = logical_to_spec(names, rules)
    for dim, (size, shards) in enumerate(zip(var.shape, spec_size(spec, mesh.shape))):
      if size % shards == 0:
        continue
      axes = _axes_text(spec[dim])
      setters = [(field, value) for field, value in fields.get(names[dim], []) if value == size]
      if setters:
        field, value = setters[0]
        bad_fields[(names[dim], field)] = (
            f"{field}={value} is not divisible by the {axes} mesh axis ({shards} devices); set "
            f"{field} to a multiple of {shards}, or use a smaller {axes} axis."
        )
      else:
        bad_params.append(
            f"parameter {jax.tree_util.keystr(path)} has {names[dim]} size {size}, not divisible "
            f"by the {axes} mesh axis ({shards} devices); change its size or the mesh."
        )
  order = [(name, field) for name, options in fields.items() for field, _ in options]
  problems = [bad_fields[key] for key in order if key in bad_fields] + bad_params
  if problems:
    raise ValueError("\n".join(problems))
