"""Reductions: a sum adds variances; a mean over n divides them by n^2; norms, standard deviations, logsumexp
and max / min over dims are linearised at the mean."""

from __future__ import annotations

import torch
from torch.func import vjp

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


#: Reductions whose each output reads its own slice of the inputs, linearised: op -> positions of (dim, keepdim),
#: keepdim None where the op has none (it drops the dims).
LINEARISED_REDUCTIONS = {
    aten.linalg_vector_norm.default: (2, 3),
    aten.std.dim: (1, 3), aten.std.correction: (1, 3), aten.var.dim: (1, 3), aten.var.correction: (1, 3),
    aten.logsumexp.default: (1, 2),
    aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.cosine_similarity.default: (2, None),
}


@register(*LINEARISED_REDUCTIONS)
def reduction_linearised(call: RuleCall) -> torch.Tensor:
    """A norm (F.normalize, CLIP's embedding norm), a standard deviation or variance (a layer norm written by
    hand), logsumexp, a max / min over dims, or the cosine similarity of two uncertain tensors (taken as
    independent), linearised: sum_i (d out / dx_i)^2 v_i over every uncertain input x. A max passes the
    variance of the element the mean selects (ties share it, as its derivative does).

    Each output reads its own inputs, so one vector-Jacobian product with ones gives every
    input's slope; the weighted variances are then summed like the op's own reduction. (PyTorch's
    decomposition of cosine_similarity reads each input twice, which per-op rules would count as independent.)
    """
    if call.structure == "full":
        return linearised_full(call)
    return _slope_weighted(call, lambda out: out, *LINEARISED_REDUCTIONS[call.op])


@register(aten.var_mean.correction, aten.std_mean.correction)
def statistic_and_mean(call: RuleCall) -> list[torch.Tensor]:
    """``torch.var_mean`` / ``std_mean``: the statistic linearised as above, the mean's variances summed and
    divided by n^2 (the two outputs' covariance is not carried, as for any op with several outputs)."""
    outputs = (lambda out: out[0], lambda out: out[1])
    if call.structure == "full":
        return [linearised_full(call, output=pick) for pick in outputs]
    return [_slope_weighted(call, pick, 1, 3) for pick in outputs]


def _slope_weighted(call: RuleCall, pick, dim_at: int, keepdim_at: int | None) -> torch.Tensor:
    """sum_i (d pick(out) / dx_i)^2 v_i over every uncertain input x, summed over the reduced dims."""
    dims = call.arg(dim_at)
    dims = [dims] if isinstance(dims, int) else list(dims) if dims else None
    keepdim = bool(call.arg(keepdim_at)) if keepdim_at is not None else False
    out = pick(call.out)
    # An input broadcast against the other (a prototype compared with every sample) is expanded first, so
    # that the vector-Jacobian product gives each output's slope rather than their sum.
    shape = torch.broadcast_shapes(*(value.shape for _, value in call.tensors()))
    total = None
    for path, mean, var, _ in call.uncertain():
        mean, var = mean.expand(shape), var.expand(shape)
        _, pull = vjp(lambda h, path=path: pick(call.call_with({path: h})), mean)
        (slope,) = pull(torch.ones_like(out))
        term = aten.sum.dim_IntList(slope.square() * var, dims, keepdim)
        total = term if total is None else total + term
    return torch.broadcast_to(total, out.shape).to(out.dtype)


@register(aten.cumsum.default)
def cumulative_sum(call: RuleCall) -> torch.Tensor:
    """Each output sums a prefix of the input: J has unit entries, so J v."""
    if call.structure == "full":
        return linearised_full(call)
    return routed_variance(call)



@register(aten.max.dim, aten.min.dim)
def extremum(call: RuleCall) -> list[torch.Tensor | None]:
    """``x.max(dim)``: the values take the variance of the element the mean selects (the op's own indices,
    its second output, say which); the indices carry none."""
    if call.structure == "full":
        return [linearised_full(call, output=lambda out: out[0]), None]
    dim, keepdim = call.arg(1), bool(call.arg(2))
    indices = call.out[1] if keepdim else call.out[1].unsqueeze(dim)
    picked = call.cov(0).gather(dim, indices)
    return [picked if keepdim else picked.squeeze(dim), None]
