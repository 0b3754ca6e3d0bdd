"""Convolutions (1-D, 2-D, 3-D, grouped, depthwise): the linear rule through the im2col view.

A convolution is a linear map applied at every output position p to the patch
u_p = im2col(x)_p, with the kernel flattened to (Cout, Cin*k*k) (laplace-torch's
convention for KFAC). So

    Cov[h] = J S J^T (J: the conv in x) + weight term over the patches + bias term

with the weight term of the kernel's posterior kind from
:mod:`fxstream.rules.weights`. For a diagonal kernel posterior and diagonal
activations the patches are never formed: var = conv(s, M^2) + conv(m^2 + s, V) + var_b.

A transposed convolution (a decoder's upsampling) is the same bilinear map of
input and kernel, in which each output still meets every kernel entry at most
once per input channel, so with a diagonal kernel posterior its variance is the
same formula with the transposed op.
"""

from __future__ import annotations

import torch

from .linear import bias_full, parameter
from .linearise import linear_sandwich
from .registry import RuleCall, register
from .weights import (
    PARAM_KINDS,
    bias_covariance,
    bias_variance,
    layer_problem,
    plus,
    second_moment,
    weight_diag,
    weight_full,
)

aten = torch.ops.aten

CONVOLUTIONS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
TRANSPOSED = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def _param_kind(call: RuleCall, index: int) -> str | None:
    kind = call.kind(index)
    return kind if isinstance(kind, str) and kind.startswith("param") else None


def _conv_problem(call: RuleCall) -> str | None:
    """Kernel and bias posterior kinds the rule cannot combine, or an uncertain kernel that is an activation."""
    if call.cov(1) is not None and _param_kind(call, 1) is None:
        return f"{call.op}: a kernel computed from the input (a dynamic convolution) is not supported"
    if call.cov(2) is not None and _param_kind(call, 2) is None:
        return f"{call.op}: a bias computed from the input is not supported; add it after the convolution"
    problem = layer_problem(_param_kind(call, 1), _param_kind(call, 2), groups=call.arg(6))
    return None if problem is None else f"{call.op}: {problem}"


@register(*CONVOLUTIONS, param_kinds=PARAM_KINDS, supports=_conv_problem)
def conv(call: RuleCall) -> torch.Tensor:
    x, w = call.arg(0), call.arg(1)
    vx, weight, bias = call.cov(0), parameter(call, 1), parameter(call, 2)
    geometry = tuple(call.arg(i) for i in range(3, 7))  # stride, padding, dilation, groups
    if call.structure == "full":
        return _conv_full(call, x, vx, w, weight, bias, geometry)
    return _conv_diag(call, x, vx, w, weight, None if bias is None else bias_variance(*bias), geometry)


def _conv_diag(call: RuleCall, x, vx, w, weight, var_b, geometry) -> torch.Tensor:
    """op(s, M^2) + weight term + var_b with the op's own geometry (a convolution or a transposed one)."""
    var = None
    if vx is not None:  # the bias variance rides along as the conv's own bias
        var = call.op(vx, w.square(), var_b, *geometry)
        var_b = None
    if weight is not None:
        var = plus(var, _weight_diag(call, x, vx if call.second_order else None, weight, var_b, geometry))
    elif var_b is not None:
        var = var_b.reshape((-1,) + (1,) * (x.dim() - 2))
    return torch.broadcast_to(var, call.out.shape)


def _transposed_problem(call: RuleCall) -> str | None:
    """A transposed convolution takes diagonal kernel and bias posteriors, and full activations only with a
    deterministic kernel and bias."""
    for index, what in ((1, "kernel"), (2, "bias")):
        if call.cov(index) is None:
            continue
        kind = _param_kind(call, index)
        if kind is None:
            return f"{call.op}: a {what} computed from the input is not supported"
        if kind != "param_diag":
            return (f"{call.op}: a '{kind}' posterior on the {what} of a transposed convolution is not supported; "
                    f"give it a diagonal posterior (e.g. posterior.to_diagonal())")
        if call.structure == "full":
            return (f"{call.op}: an uncertain {what} with activation_cov='full' is not supported; use "
                    f"activation_cov='diag' or leave the {what} out of the posterior")
    return None


@register(*TRANSPOSED, supports=_transposed_problem)
def conv_transpose(call: RuleCall) -> torch.Tensor:
    x, w, vx = call.arg(0), call.arg(1), call.cov(0)
    geometry = tuple(call.arg(i) for i in range(3, 8))  # stride, padding, output_padding, groups, dilation
    if call.structure == "full":
        return linear_sandwich(lambda h: call.op(h, w, None, *geometry), vx, x.shape[1:])
    return _conv_diag(call, x, vx, w, parameter(call, 1), call.cov(2), geometry)


def _weight_diag(call: RuleCall, x, vx, weight, var_b, geometry) -> torch.Tensor:
    """The weight term plus the bias variances ``var_b`` (None: none), per output element."""
    kind, tensors = weight
    if kind == "param_diag":
        return call.op(second_moment(x, vx), tensors[0], var_b, *geometry)
    u = _patches(call, x, geometry)
    vu = None if vx is None else _patches(call, vx, geometry)
    rows = weight_diag(kind, _ungrouped(kind, tensors, geometry[3]), u.transpose(1, 2),
                       None if vu is None else vu.transpose(1, 2), var_b)
    return rows.transpose(1, 2).reshape(call.out.shape)


def _conv_full(call: RuleCall, x, vx, w, weight, bias, geometry) -> torch.Tensor:
    batch = x.shape[0] if vx is None else vx.shape[0]
    out = call.out
    c_out = out.shape[1]
    positions = out[0, 0].numel()
    n = c_out * positions
    total = torch.zeros(batch, n, n, dtype=out.dtype, device=out.device)
    if vx is not None:
        total = total + linear_sandwich(lambda h: call.op(h, w, None, *geometry), vx, x.shape[1:])
    if weight is not None:
        total = total + _weight_full(call, x, vx if call.second_order else None, weight, geometry, batch, positions)
    cov_b = None if bias is None else bias_covariance(*bias)
    if cov_b is not None:
        total = total + bias_full(cov_b, positions, batch).reshape(batch, positions, c_out, positions, c_out) \
            .permute(0, 2, 1, 4, 3).reshape(batch, n, n)
    return total


def _weight_full(call: RuleCall, x, vx, weight, geometry, batch: int, positions: int) -> torch.Tensor:
    """The weight term over the patches u = im2col(x), as per-position rows of a linear map."""
    kind, tensors = weight
    u = _patches(call, x, geometry).reshape(batch, -1, positions)
    j = u.shape[1]
    s = None
    if vx is not None:
        s = linear_sandwich(lambda h: _patches(call, h, geometry), vx, x.shape[1:])
        s = s.reshape(batch, j, positions, j, positions).permute(0, 2, 1, 4, 3)
    rows = weight_full(kind, _ungrouped(kind, tensors, geometry[3]), u.transpose(1, 2), s)
    c_out = rows.shape[2]
    n = c_out * positions
    return rows.permute(0, 2, 1, 4, 3).reshape(batch, n, n)


def _patches(call: RuleCall, h: torch.Tensor, geometry) -> torch.Tensor:
    """im2col as a depthwise conv with one-hot kernels: (B, Cin*k*k, *out_spatial), channel-major."""
    stride, padding, dilation, _ = geometry
    w = call.arg(1)
    c_in, kernel = h.shape[1], w.shape[2:]
    taps = w[0, 0].numel()
    eye = torch.eye(taps, dtype=h.dtype, device=h.device).reshape(taps, 1, *kernel)
    eye = eye.repeat(c_in, 1, *([1] * len(kernel)))
    return call.op(h, eye, None, stride, padding, dilation, c_in).flatten(2)


def _ungrouped(kind: str, tensors, groups: int):
    """The kernel posterior over all input channels' patches (zero outside each group)."""
    if groups == 1:
        return tensors
    v = tensors[0]  # param_diag: the capability check declines other kinds on a grouped conv
    blocks = v.reshape(groups, v.shape[0] // groups, -1)
    return (torch.block_diag(*blocks.unbind(0)),)
