"""Convolutions (1-D, 2-D, grouped, depthwise): the linear rule through the im2col view.

    diag:  var = conv(s, M^2 + V) + conv(m^2, V) + var_b
    full:  Cov = J S J^T (J: the conv in x) + weight term + bias term, where the
           weight term for output channels c = c' at positions p, p' is
           sum_j V_cj E[u_jp u_jp'] over the patch entries u = im2col(x).
"""

from __future__ import annotations

import torch

from .linearise import sandwich
from .registry import RuleCall, register

aten = torch.ops.aten

CONVOLUTIONS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)


@register(*CONVOLUTIONS)
def conv(call: RuleCall) -> torch.Tensor:
    x, w = call.arg(0), call.arg(1)
    vx, vw, vb = call.cov(0), call.cov(1), call.cov(2)
    geometry = tuple(call.arg(i) for i in range(3, 7))  # stride, padding, dilation, groups
    channel = (-1,) + (1,) * (x.dim() - 2)
    if call.structure == "full":
        return _conv_full(call, x, vx, w, vw, vb, geometry)
    var = 0
    if vx is not None:
        var = var + call.op(vx, w.square() + (0 if vw is None else vw), None, *geometry)
    if vw is not None:
        var = var + call.op(x.square(), vw, None, *geometry)
    if vb is not None:
        var = var + vb.reshape(channel)
    return torch.broadcast_to(var, call.out.shape)


def _conv_full(call: RuleCall, x, vx, w, vw, vb, geometry) -> torch.Tensor:
    batch = x.shape[0] if vx is None else vx.shape[0]
    out = call.out
    c_out = out.shape[1]
    positions = out[0, 0].numel()
    n = c_out * positions
    total = torch.zeros(batch, n, n, dtype=out.dtype, device=out.device)
    if vx is not None:
        total = total + sandwich(lambda h: call.op(h, w, None, *geometry), x, vx)
    if vw is not None:
        total = total + _weight_term(call, x, vx, w, vw, geometry, batch, positions)
    if vb is not None:
        shared = torch.diag_embed(vb)[:, None, :, None].expand(c_out, positions, c_out, positions)
        total = total + shared.reshape(1, n, n)
    return total


def _weight_term(call: RuleCall, x, vx, w, vw, geometry, batch: int, positions: int) -> torch.Tensor:
    """delta_cc' sum_j V_cj E[u_jp u_jp'] with u the patches of x (im2col as a depthwise conv)."""
    stride, padding, dilation, groups = geometry
    c_in = x.shape[1]
    kernel = w.shape[2:]
    taps = w[0, 0].numel()
    eye = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, *kernel).repeat(c_in, 1, *([1] * len(kernel)))

    def patches(h: torch.Tensor) -> torch.Tensor:
        return call.op(h, eye, None, stride, padding, dilation, c_in)

    u = patches(x).reshape(batch, c_in * taps, positions)
    second = u[:, :, :, None] * u[:, :, None, :]  # (B, J, P, P)
    if vx is not None:
        s = sandwich(patches, x, vx).reshape(batch, c_in * taps, positions, c_in * taps, positions)
        second = second + s.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    c_out = w.shape[0]
    blocks = vw.reshape(groups, c_out // groups, -1)
    per_channel = torch.block_diag(*blocks.unbind(0))  # (C_out, C_in * taps), zero outside each group
    term = torch.einsum("bjpq,cj->bpqc", second, per_channel)
    term = torch.diag_embed(term).permute(0, 3, 1, 4, 2)  # (B, C, P, C', P')
    n = c_out * positions
    return term.reshape(batch, n, n)
