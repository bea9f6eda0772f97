"""Parameter trees by path name, for operators that map one model's state onto another's.

Names are the '/'-joined paths of an ``nnx.State`` ("blocks/0/ffn/up/kernel"), the same
for parameters and for the optimizer moments that mirror them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
from flax import nnx

from jaxlab.nn import ModelConfig, Transformer


def by_name(state: nnx.State) -> dict[str, jax.Array]:
  """``{"blocks/0/ffn/up/kernel": array}`` for every variable of ``state``."""
  return {"/".join(map(str, path)): leaf.get_value() for path, leaf in nnx.to_flat_state(state)}


def rebuild(template: nnx.State, value_for: Callable[[str, jax.Array], jax.Array]) -> nnx.State:
  """``template`` with each variable's value replaced by ``value_for(name, template value)``;
  the variables keep their metadata (logical axis names)."""
  return nnx.from_flat_state([
      (path, leaf.replace(value_for("/".join(map(str, path)), leaf.get_value())))
      for path, leaf in nnx.to_flat_state(template)
  ])


def differing_fields(config: ModelConfig, target: ModelConfig, allowed: Iterable[str]) -> list[str]:
  """The fields of two configs that differ, except those an operator may change."""
  allowed = set(allowed)
  return [f"model.{f.name}: {getattr(config, f.name)!r} -> {getattr(target, f.name)!r}"
          for f in dataclasses.fields(ModelConfig)
          if f.name not in allowed and getattr(config, f.name) != getattr(target, f.name)]


def abstract_params(config: ModelConfig) -> nnx.State:
  """The parameters of a model of ``config``, as shapes and logical axes (no compute)."""
  return jax.eval_shape(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
