"""Reductions: a sum adds variances; a mean over n divides them by n^2; a norm is linearised at the mean."""

from __future__ import annotations

import torch

from torch.func import vjp

from .linearise import linearised_full, routed_variance
from .registry import RuleCall, arg_path, register

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


@register(aten.linalg_vector_norm.default)
def vector_norm(call: RuleCall) -> torch.Tensor:
    """||x|| over some dims (F.normalize, CLIP's embedding norm), linearised: sum_i (d||x|| / dx_i)^2 v_i.

    Each output reads its own inputs, so one vector-Jacobian product with ones gives every
    input's slope; the weighted variances are then summed like the norm's own reduction.
    """
    if call.structure == "full":
        return linearised_full(call)
    x, var = call.arg(0), call.cov(0)
    _, pull = vjp(lambda h: call.call_with({arg_path(0): h}), x)
    (slope,) = pull(torch.ones_like(call.out))
    dims, keepdim = call.arg(2), bool(call.arg(3))
    return aten.sum.dim_IntList(slope.square() * var, list(dims) if dims else None, keepdim).to(call.out.dtype)
