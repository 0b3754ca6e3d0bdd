"""softmax and log_softmax, linearised at the mean: J = diag(p) - p p^T on the softmax dimension."""

from __future__ import annotations

import torch

from .linearise import linearised_full
from .registry import RuleCall, register

aten = torch.ops.aten


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def softmax(call: RuleCall) -> torch.Tensor:
    """Diagonal of J diag(v) J^T.

    softmax:     J_ij = p_i (d_ij - p_j)  ->  p_i^2 ((1 - 2 p_i) v_i + sum_j p_j^2 v_j)
    log_softmax: J_ij = d_ij - p_j        ->  (1 - 2 p_i) v_i + sum_j p_j^2 v_j
    """
    if call.structure == "full":
        return linearised_full(call)
    x, dim, var = call.arg(0), call.arg(1), call.cov(0)
    p = torch.softmax(x.to(var.dtype), dim)
    shared = (p.square() * var).sum(dim, keepdim=True)
    var_log = (1 - 2 * p) * var + shared
    if call.op in (aten.softmax.int, aten._softmax.default):
        return p.square() * var_log
    return var_log
