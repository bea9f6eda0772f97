"""The active mesh and rules, and `shard`, the one activation-constraint helper."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab.sharding.rules import Rules, logical_to_spec

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxlab_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes ``mesh`` and ``rules`` active for tracing and for `shard`."""
  token = _RULES.set(rules)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _RULES.reset(token)


def active_rules() -> Rules | None:
  return _RULES.get()


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains ``x`` to the sharding its logical names resolve to; a no-op without a mesh."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def named_sharding(mesh: Mesh, names: Sequence[str | None] | None, rules: Rules) -> NamedSharding:
  """The NamedSharding of a tensor with logical ``names`` (replicated for ``None``)."""
  spec = PartitionSpec() if names is None else logical_to_spec(names, rules)
  return NamedSharding(mesh, spec)


def mesh_axes_of(name: str):
  """The mesh axes a logical name resolves to under the active mesh and rules (None
  without a mesh): what a kernel's shard_map splits that dimension over."""
  rules = _RULES.get()
  if rules is None or jax.sharding.get_abstract_mesh().empty:
    return None
  return logical_to_spec((name,), rules)[0]
