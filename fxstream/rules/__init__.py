"""The covariance rules, one module per op family; importing this fills RULES."""

from . import activation, arithmetic, conv, linear, norm, pool, reduce, shape, softmax  # noqa: F401
from .registry import RULES, Rule, RuleCall, register

__all__ = ["RULES", "Rule", "RuleCall", "register"]
