"""Pooling. Average pooling is linear; max pooling routes the mean's argmax."""

from __future__ import annotations

import torch

from .linearise import linearised_full, routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten


@register(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def max_pool(call: RuleCall) -> torch.Tensor:
    """Linearised at the mean: each output takes the variance of the element the mean selects."""
    if call.structure == "full":
        return linearised_full(call)
    if _tiles(call):
        return _tiled_max_variance(call)
    return routed_variance(call)


def _tiles(call: RuleCall) -> bool:
    """Whether the windows tile the input exactly: stride = kernel, no padding or dilation, sizes divisible."""
    kernel, stride, padding, dilation = (list(call.arg(i)) for i in range(1, 5))
    sizes = call.arg(0).shape[-len(kernel):]
    return (stride in ([], kernel) and not any(padding) and all(d == 1 for d in dilation)
            and all(n % k == 0 for n, k in zip(sizes, kernel)))


def _tiled_max_variance(call: RuleCall) -> torch.Tensor:
    """The max-pool diag rule for tiling windows, as elementwise ops on a (..., windows, k) view.

    Routing through the op's JVP (a gather by the pool's indices) makes Inductor
    emit a scalar loop with per-element index arithmetic that recomputes the
    upstream variance: on the core benchmark's CNN it cost more than the
    convolutions. argmax picks the first maximum, as max_pool does.
    """
    x, kernel = call.arg(0), list(call.arg(1))
    spatial, lead = len(kernel), x.dim() - len(kernel)
    shape = [*x.shape[:lead], *(v for n, k in zip(x.shape[lead:], kernel) for v in (n // k, k))]
    order = [*range(lead), *(lead + 2 * i for i in range(spatial)), *(lead + 2 * i + 1 for i in range(spatial))]

    def windows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(shape).permute(order).flatten(-spatial)

    mean = windows(x)
    selected = mean.argmax(-1, keepdim=True) == torch.arange(mean.shape[-1], device=x.device)
    return (windows(call.cov(0)) * selected).sum(-1)


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
