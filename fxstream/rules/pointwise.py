"""Any ATen op tagged pointwise, linearised at the means: the fallback for pointwise ops without a rule.

An op PyTorch tags ``torch.Tag.pointwise`` computes each output element from
the elements at the same (broadcast) position of its inputs, so its Jacobian
in each input is diagonal after broadcasting. Linearised at the means, the
output variance is sum_k g_k'(mu)^2 v_k over the uncertain inputs k
(independent), with g_k' = J_k 1 from one forward-mode JVP per input; full
covariances are J S J^T. This is exact to first order for the whole op at
once, where a decomposition would split it into paths that fork and rejoin
(``lerp``, ``celu``, ``addcmul``) and count them as independent.
"""

from __future__ import annotations

import functools

import torch
from torch._ops import OpOverload

from .linearise import derivative, linearised_full
from .registry import RULES, Rule, RuleCall, _graph_target

aten = torch.ops.aten


def pointwise(call: RuleCall) -> torch.Tensor:
    """sum_k g_k'(mu)^2 v_k over the uncertain inputs (diag), or J S J^T (full)."""
    if call.structure == "full":
        return linearised_full(call)
    total = 0
    for path, mean, cov, _ in call.uncertain():
        slope = derivative(lambda h, path=path: call.call_with({path: h}), mean)
        total = total + cov * slope.square()
    return torch.broadcast_to(total, call.out.shape)


def is_pointwise(op) -> bool:
    return isinstance(op, OpOverload) and torch.Tag.pointwise in op.tags


@functools.cache
def _fallback(op: OpOverload) -> Rule:
    return Rule(op, pointwise, "pointwise", graph_target=_graph_target(pointwise, op))


def rule_for(op) -> Rule | None:
    """The rule registered for ``op``, else the pointwise fallback for an op tagged pointwise, else None."""
    rule = RULES.get(op)
    if rule is None and is_pointwise(op):
        return _fallback(op)
    return rule
