"""Reductions: a sum adds variances; a mean over n divides them by n^2."""

from __future__ import annotations

import torch

from .linearise import linearised_full, routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten


@register(aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim)
def reduce(call: RuleCall) -> torch.Tensor:
    """sum: J has unit entries, so J v; mean over n: (1/n^2) sum v = mean(v) / n."""
    if call.structure == "full":
        return linearised_full(call)
    var = routed_variance(call)
    if call.op in (aten.mean.default, aten.mean.dim):
        var = var * (call.out.numel() / call.arg(0).numel())
    return var
