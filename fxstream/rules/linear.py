"""Linear maps: linear, addmm, mm, matmul, bmm with uncertain inputs and/or weights.

Weights are independent of the input (the paper's assumption), so the output
moments are exact under a Gaussian input and a diagonal weight posterior:

    diag:  var = s @ (M^2 + V)^T + m^2 @ V^T + var_b
    full:  Cov = M S M^T + delta_kl sum_i V_ki E[x_ai x_a'i] + var_b   (a, a': rows of a sample)
"""

from __future__ import annotations

import torch

from .linearise import batch_size
from .registry import RuleCall, register

aten = torch.ops.aten


def contraction_variance(mx, vx, my, vy) -> torch.Tensor:
    """Variance of X @ Y for independent X, Y with elementwise variances (None: deterministic)."""
    total = 0
    if vx is not None:
        total = total + vx @ (my.square() + (0 if vy is None else vy))
    if vy is not None:
        total = total + mx.square() @ vy
    return total


def affine_full(x, vx, w, vw, vb, batch: int) -> torch.Tensor:
    """Per-sample covariance (B, N, N) of x @ w^T + b; x (.., Din) with full cov vx, w (Dout, Din)."""
    d_out, d_in = w.shape
    rows = x.numel() // (batch * d_in)
    total = 0
    moments = x.reshape(batch, rows, d_in)
    moments = moments[:, :, None, :] * moments[:, None, :, :]  # E[x_ai] E[x_a'i]: (B, L, L, Din)
    if vx is not None:
        s = vx.reshape(batch, rows, d_in, rows, d_in)
        total = total + torch.einsum("ki,bxiyj,lj->bxkyl", w, s, w)
        moments = moments + s.diagonal(dim1=2, dim2=4)
    if vw is not None:
        per_output = torch.einsum("bxyi,ki->bxyk", moments, vw)
        total = total + torch.diag_embed(per_output).permute(0, 1, 3, 2, 4)
    n = rows * d_out
    total = torch.broadcast_to(total, (batch, rows, d_out, rows, d_out)).reshape(batch, n, n)
    return total if vb is None else total + bias_full(vb, rows, batch)


def bias_full(vb: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
    """Per-sample covariance of a bias shared by all ``rows`` of a sample: var_b[k] wherever k = l."""
    d_out = vb.shape[-1]
    shared = torch.diag_embed(vb)[:, None, :].expand(rows, d_out, rows, d_out)
    n = rows * d_out
    return shared.reshape(1, n, n).expand(batch, n, n)


def _check_weight(call: RuleCall, index: int) -> None:
    kind = call.kind(index)
    if kind is not None and not kind.startswith("param"):
        raise ValueError(f"{call.op}: full covariance when both operands are activations is not supported")


@register(aten.linear.default)
def linear(call: RuleCall) -> torch.Tensor:
    """x @ W^T + b."""
    x, w = call.arg(0), call.arg(1)
    vx, vw, vb = call.cov(0), call.cov(1), call.cov(2)
    if call.structure == "full":
        _check_weight(call, 1)
        return affine_full(x, vx, w, vw, vb, batch_size(call))
    var = contraction_variance(x, vx, w.t(), None if vw is None else vw.t())
    return torch.broadcast_to(var + (0 if vb is None else vb), call.out.shape)


@register(aten.addmm.default, aten.mm.default)
def addmm(call: RuleCall) -> torch.Tensor:
    """beta * b + alpha * (x @ y) (addmm) and x @ y (mm); y is the weight (Din, Dout)."""
    if call.op is aten.mm.default:
        (x, vx), (y, vy), vb, beta, alpha = (call.arg(0), call.cov(0)), (call.arg(1), call.cov(1)), None, 1, 1
    else:
        (x, vx), (y, vy), vb = (call.arg(1), call.cov(1)), (call.arg(2), call.cov(2)), call.cov(0)
        beta, alpha = float(call.kwargs.get("beta", 1)), float(call.kwargs.get("alpha", 1))
    if call.structure == "full":
        _check_weight(call, 2 if call.op is aten.addmm.default else 1)
        cov = alpha**2 * affine_full(x, vx, y.t(), None if vy is None else vy.t(), None, batch_size(call))
        if vb is not None:
            rows = x.numel() // (batch_size(call) * x.shape[-1])
            cov = cov + bias_full(beta**2 * vb, rows, batch_size(call))
        return cov
    var = alpha**2 * contraction_variance(x, vx, y, vy)
    return torch.broadcast_to(var + (0 if vb is None else beta**2 * vb), call.out.shape)


@register(aten.matmul.default, aten.bmm.default)
def matmul(call: RuleCall) -> torch.Tensor:
    """x @ y. With a 2-D y it is a linear layer; batched products of activations are diag only."""
    x, y = call.arg(0), call.arg(1)
    vx, vy = call.cov(0), call.cov(1)
    if call.structure == "full":
        if y.dim() != 2:
            raise ValueError(f"{call.op}: full covariance of a batched product is not supported; use diag")
        _check_weight(call, 1)
        return affine_full(x, vx, y.t(), None if vy is None else vy.t(), None, batch_size(call))
    return torch.broadcast_to(contraction_variance(x, vx, y, vy), call.out.shape)
