"""Operators on parameter trees that turn one model into a larger or different one."""

from jaxlab.growth import readme
from jaxlab.growth.upcycle import check_upcycle, upcycle

__all__ = ["check_upcycle", "readme", "upcycle"]
