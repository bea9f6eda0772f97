"""Operators on parameter trees that turn one model into a larger or different one."""

from jaxlab.growth import readme
from jaxlab.growth.grow import OPERATORS, check_grow, grow, new_layers
from jaxlab.growth.ligo import LiGO
from jaxlab.growth.upcycle import check_upcycle, upcycle

__all__ = ["LiGO", "OPERATORS", "check_grow", "check_upcycle", "grow", "new_layers", "readme", "upcycle"]
