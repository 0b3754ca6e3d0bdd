"""Pooling. Average pooling is linear; max pooling routes the mean's argmax."""

from __future__ import annotations

import itertools

import torch

from .linearise import linearised_full, routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten


@register(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def max_pool(call: RuleCall) -> torch.Tensor:
    """Linearised at the mean: each output takes the variance of the element the mean selects."""
    if call.structure == "full":
        return linearised_full(call)
    return _selected_variance(call)


def _selected_variance(call: RuleCall) -> torch.Tensor:
    """The max-pool diag rule as a select over the k window offsets, elementwise.

    Offset i of every window is one strided slice of the (padded) input, so the
    rule is a running maximum with k - 1 compare-and-select steps on
    output-sized views: no index tensors, no copies in eager, and one fused loop
    in Inductor (a gather by the pool's indices made Inductor recompute the
    upstream variance per element). It never compares with the pooled mean, so
    it cannot disagree with a differently fused max. A strict comparison keeps
    the first maximum, as max_pool does.
    """
    x, var, out = call.arg(0), call.cov(0), call.out
    kernel = list(call.arg(1))
    spatial = len(kernel)
    stride = _per_dim(call.arg(2), spatial) or kernel
    padding, dilation = _per_dim(call.arg(3), spatial), _per_dim(call.arg(4), spatial)
    sizes = out.shape[-spatial:]
    pads = []
    for n, k, s, p, d, o in zip(x.shape[-spatial:], kernel, stride, padding, dilation, sizes):
        needed = (o - 1) * s + (k - 1) * d + 1
        pads.append((p, max(0, needed - n - p)))
    if any(before or after for before, after in pads):
        flat_pads = [amount for pair in reversed(pads) for amount in pair]
        x = torch.nn.functional.pad(x, flat_pads, value=float("-inf"))
        var = torch.nn.functional.pad(var, flat_pads, value=0.0)

    def window_offset(t: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
        index = [slice(None)] * (t.dim() - spatial)
        index += [slice(i * d, i * d + (o - 1) * s + 1, s) for i, d, o, s in zip(offset, dilation, sizes, stride)]
        return t[tuple(index)]

    offsets = itertools.product(*(range(k) for k in kernel))
    first = next(offsets)
    best, selected = window_offset(x, first), window_offset(var, first)
    for offset in offsets:
        candidate = window_offset(x, offset)
        wins = candidate > best
        best = torch.maximum(candidate, best)
        selected = torch.where(wins, window_offset(var, offset), selected)
    return selected


ADAPTIVE_MAX = {aten.adaptive_max_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2,
                aten.adaptive_max_pool3d.default: 3}


@register(*ADAPTIVE_MAX)
def adaptive_max_pool(call: RuleCall) -> list[torch.Tensor | None]:
    """Each output takes the variance of the element its index (the op's second output) selects; the indices
    carry none."""
    if call.structure == "full":
        return [linearised_full(call, output=lambda out: out[0]), None]
    spatial, indices = ADAPTIVE_MAX[call.op], call.out[1]
    selected = call.cov(0).flatten(-spatial).gather(-1, indices.flatten(-spatial))
    return [selected.reshape(indices.shape), None]


def _per_dim(value, spatial: int) -> list[int]:
    """A pooling size argument as one int per spatial dim ([] stays [])."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * spatial if len(values) == 1 else values


@register(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
          aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default)
def avg_pool(call: RuleCall) -> torch.Tensor:
    """An average of d elements: sum of variances / d^2 = avg(v) / d, d per window."""
    if call.structure == "full":
        return linearised_full(call)
    return routed_variance(call) * _inverse_window_size(call)


def _inverse_window_size(call: RuleCall) -> torch.Tensor:
    """1/d for every output element (d: the divisor the op uses for that window)."""
    x, out = call.arg(0), call.out
    if call.op in (aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
                   aten.adaptive_avg_pool3d.default):
        spatial = len(call.arg(1))
        counts = torch.ones((), dtype=x.dtype, device=x.device)
        for axis in range(spatial):
            n_in, n_out = x.shape[x.dim() - spatial + axis], out.shape[out.dim() - spatial + axis]
            i = torch.arange(n_out, device=x.device)
            size = (torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
                    - torch.div(i * n_in, n_out, rounding_mode="floor")).to(x.dtype)
            counts = counts.unsqueeze(-1) * size
        return torch.broadcast_to(1.0 / counts, out.shape)
    ones = torch.ones_like(x)
    kernel, stride, padding, ceil_mode, include_pad = (call.arg(i) for i in range(1, 6))
    if call.op is aten.avg_pool1d.default:
        pool, ones = aten.avg_pool2d.default, ones.unsqueeze(-2)
        kernel, stride, padding = [1, *kernel], [1, *(stride or kernel)], [0, *padding]
        divisor = None
    else:
        pool, divisor = call.op, call.arg(6)
    averaged = pool(ones, kernel, stride, padding, ceil_mode, include_pad, divisor)
    summed = pool(ones, kernel, stride, padding, ceil_mode, include_pad, 1)
    return (averaged / summed).reshape(out.shape)
