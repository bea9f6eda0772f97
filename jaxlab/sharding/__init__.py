"""Meshes, logical-axis rules and sharding helpers."""

from jaxlab.sharding.context import active_rules, mesh_axes_of, named_sharding, shard, use_mesh
from jaxlab.sharding.mesh import make_mesh, mesh_shape
from jaxlab.sharding.rules import (
    LOGICAL_AXES, MESH_AXES, STRATEGIES, Rules, logical_to_spec, strategy_rules,
)
from jaxlab.sharding.validate import check_batch, check_divisible, check_expert_axis, check_mesh_use

__all__ = [
    "LOGICAL_AXES", "MESH_AXES", "STRATEGIES", "Rules", "active_rules", "check_batch",
    "check_divisible", "check_expert_axis", "check_mesh_use", "logical_to_spec", "make_mesh", "mesh_axes_of", "mesh_shape",
    "named_sharding", "shard", "strategy_rules", "use_mesh",
]
