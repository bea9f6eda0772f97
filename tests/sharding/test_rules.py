"""Logical-name resolution and mesh shapes (single device; see tests/multidevice)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.sharding import STRATEGIES, logical_to_spec, make_mesh, mesh_shape, shard, strategy_rules


@pytest.mark.parametrize(
    "strategy, names, expected",
    [
        ("dp", ("batch", "length", "embed"), P(("data", "fsdp", "expert"), None, None)),
        ("dp", ("embed", "mlp"), P(None, None)),
        ("fsdp", ("embed", "mlp"), P("fsdp", None)),
        # batch is listed first, so on activations it takes fsdp and embed stays whole
        ("fsdp", ("batch", "length", "embed"), P(("data", "fsdp", "expert"), None, None)),
        ("fsdp_tp", ("embed", "heads", "head_dim"), P("fsdp", "tensor", None)),
        ("fsdp_tp", ("heads", "head_dim", "embed"), P("tensor", None, "fsdp")),
        ("fsdp_tp", ("vocab", "embed"), P("tensor", "fsdp")),
        ("fsdp_tp", ("batch", "length", "vocab"), P(("data", "fsdp", "expert"), None, "tensor")),
        # a mesh axis is used once per tensor, by the name whose rule comes first
        ("fsdp_tp", ("mlp", "heads"), P(None, "tensor")),
        # experts are split only by the expert-parallel strategies
        ("fsdp_tp", ("expert", "embed", "mlp"), P(None, "fsdp", "tensor")),
        ("fsdp_ep", ("expert", "embed", "mlp"), P("expert", "fsdp", None)),
        ("fsdp_tp_ep", ("expert", "mlp", "embed"), P("expert", "tensor", "fsdp")),
        ("fsdp_tp_ep", ("batch", "length", "embed"), P(("data", "fsdp", "expert"), None, None)),
    ],
)
def test_logical_to_spec(strategy, names, expected):
  assert logical_to_spec(names, strategy_rules(strategy)) == expected


def test_unknown_names_and_strategies_are_errors():
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    logical_to_spec(("hidden",), STRATEGIES["dp"])
  with pytest.raises(ValueError, match="sharding.strategy='zero'"):
    strategy_rules("zero")


def test_mesh_shape_fills_one_axis():
  assert mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
  assert mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2, 1)


@pytest.mark.parametrize(
    "sizes, devices, message",
    [
        ({"data": 2, "fsdp": 2}, 8, "has 4 devices but 8 are available"),
        ({"data": 3, "fsdp": -1}, 8, "does not divide the 8 devices"),
        ({"data": -1, "fsdp": -1}, 8, "at most one axis may be -1"),
        ({"data": 0}, 8, "mesh.data=0"),
        ({"model": 2}, 8, "unknown axes"),
    ],
)
def test_bad_meshes_name_the_problem(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    mesh_shape(sizes, devices)


def test_shard_is_a_noop_without_a_mesh():
  x = jnp.ones((2, 3, 4))
  assert shard(x, ("batch", "length", "embed")) is x


def test_make_mesh_uses_auto_axes():
  mesh = make_mesh({"data": -1})
  assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
