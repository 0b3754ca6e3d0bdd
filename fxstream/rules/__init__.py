"""The covariance rules, one module per op family; importing this fills RULES."""

from . import (  # noqa: F401
    activation, arithmetic, attention, conv, embedding, interpolate, linear, norm, pool, reduce, shape, softmax,
)
from .creation import VALUE_INDEPENDENT
from .pointwise import is_pointwise, rule_for
from .patterns import mean_only_nodes
from .registry import DEFAULT_RULE_OPTIONS, RULE_OPTIONS, RULES, Rule, RuleCall, register

__all__ = ["DEFAULT_RULE_OPTIONS", "RULES", "VALUE_INDEPENDENT", "is_pointwise", "rule_for", "RULE_OPTIONS", "Rule", "RuleCall", "mean_only_nodes", "register"]
