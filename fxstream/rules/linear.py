"""Linear maps: linear, addmm, mm, matmul, bmm with uncertain inputs and/or weights.

Weights are independent of the input (the paper's assumption), so the output
moments are exact under a Gaussian input, for every weight posterior kind:

    Cov[h] = M S M^T + Cov[(W - M) x] + Cov[b]

The first term is here; the weight and bias terms come from
:mod:`fxstream.rules.weights`, chosen by the parameter's posterior kind. For a
diagonal weight posterior and diagonal activations that is
var = s @ (M^2)^T + (m^2 + s) @ V^T + var_b.
"""

from __future__ import annotations

import torch

from .linearise import batch_size, linearised_full
from .registry import RULES, RuleCall, register
from .weights import (
    AFFINE_BIAS,
    PARAM_KINDS,
    WEIGHT_STRUCTURES,
    as_tensors,
    bias_covariance,
    bias_variance,
    by_output_blocks,
    matmul_into,
    plus,
    squared,
    transposed,
    weight_diag,
    weight_full,
    weight_by_rows,
)

aten = torch.ops.aten

Param = tuple[str, tuple[torch.Tensor, ...]] | None


def contraction_variance(mx, vx, my, vy, second_order: bool = True) -> torch.Tensor:
    """Variance of X @ Y for independent X, Y with elementwise variances (None: deterministic).

    ``second_order`` keeps the vx @ vy term (exact moments); without it, first order.
    """
    total = 0
    if vx is not None:
        total = total + vx @ (my.square() + (vy if vy is not None and second_order else 0))
    if vy is not None:
        total = total + mx.square() @ vy
    return total


def affine_diag(x: torch.Tensor, vx: torch.Tensor | None, w: torch.Tensor, weight: Param,
                into: torch.Tensor | None = None, second_order: bool = True) -> torch.Tensor | None:
    """``into`` plus the variances of x @ w^T: input term s @ (M^2)^T plus the weight posterior's term.

    The weight term meets E[x x^T] (``second_order``) or only m m^T (first order).
    Both GEMMs run a block of output rows at a time for a large w (see ``by_output_blocks``).
    """
    moments = vx if second_order else None
    weight_term = None if weight is None else weight_by_rows(*weight, x, moments)
    if weight is not None and weight_term is None:
        into = weight_diag(*weight, x, moments, into)
    if weight_term is None and vx is None:
        return into

    def rows_variance(var: torch.Tensor | None, rows: slice) -> torch.Tensor:
        if weight_term is not None:
            var = weight_term(var, rows)
        if vx is not None:
            var = matmul_into(var, vx, squared(w[rows]).t())
        return var

    return by_output_blocks(into, rows_variance, w, x)


def affine_full(x: torch.Tensor, vx: torch.Tensor | None, w: torch.Tensor, weight: Param, batch: int,
                second_order: bool = True) -> torch.Tensor:
    """Per-sample covariance (B, N, N) of x @ w^T; x (.., Din) with full cov vx, w (Dout, Din)."""
    d_out, d_in = w.shape
    rows = x.numel() // (batch * d_in)
    x = x.reshape(batch, rows, d_in)
    s = None if vx is None else vx.reshape(batch, rows, d_in, rows, d_in)
    total = x.new_zeros(())
    if s is not None:
        total = total + torch.einsum("ki,bxiyj,lj->bxkyl", w, s, w)
    if weight is not None:
        total = total + weight_full(*weight, x, s if second_order else None)
    n = rows * d_out
    return torch.broadcast_to(total, (batch, rows, d_out, rows, d_out)).reshape(batch, n, n)


def bias_full(cov_b: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
    """Per-sample covariance of a bias (covariance ``cov_b``) shared by all ``rows`` of a sample."""
    d_out = cov_b.shape[-1]
    shared = cov_b[None, :, None, :].expand(rows, d_out, rows, d_out)
    n = rows * d_out
    return shared.reshape(1, n, n).expand(batch, n, n)


def parameter(call: RuleCall, index: int) -> Param:
    """(kind, tensors) of an uncertain parameter argument, None when it is deterministic."""
    cov = call.cov(index)
    return None if cov is None else (call.kind(index), as_tensors(cov))


def transposed_weight(param: Param) -> Param:
    """The posterior of P^T for a parameter P (Din, Dout) used as ``x @ P``."""
    return None if param is None else (param[0], transposed(*param))


def _check_bias(call: RuleCall, weight: Param, bias: Param) -> None:
    joint = weight is not None and WEIGHT_STRUCTURES[weight[0]].affine
    if joint != (bias is not None and bias[0] == AFFINE_BIAS):
        raise ValueError(
            f"{call.op}: a posterior over weight and bias jointly needs both in the same layer call"
        )


def _is_param(call: RuleCall, index: int) -> bool:
    kind = call.kind(index)
    return isinstance(kind, str) and kind.startswith("param")


def affine(call: RuleCall, x, w, weight: Param, bias: Param, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Covariance of alpha * (x @ w^T) + beta * b in the call's activation structure."""
    _check_bias(call, weight, bias)
    vx = call.cov(0) if call.op is not aten.addmm.default else call.cov(1)
    if call.structure == "full":
        batch = batch_size(call)
        cov = alpha**2 * affine_full(x, vx, w, weight, batch, call.second_order)
        cov_b = None if bias is None else bias_covariance(*bias)
        if cov_b is not None:
            rows = x.numel() // (batch * x.shape[-1])
            cov = cov + bias_full(beta**2 * cov_b, rows, batch)
        return cov
    var_b = None if bias is None else bias_variance(*bias)
    if var_b is not None and beta != 1:
        var_b = beta**2 * var_b
    if alpha == 1:
        var = affine_diag(x, vx, w, weight, var_b, call.second_order)
    else:
        body = affine_diag(x, vx, w, weight, second_order=call.second_order)
        var = var_b if body is None else plus(var_b, alpha**2 * body)
    return torch.broadcast_to(var, call.out.shape)


@register(aten.linear.default, param_kinds=PARAM_KINDS)
def linear(call: RuleCall) -> torch.Tensor:
    """x @ W^T + b."""
    x, w = call.arg(0), call.arg(1)
    if _is_param(call, 1) or call.cov(1) is None:
        return affine(call, x, w, parameter(call, 1), parameter(call, 2))
    vw = call.cov(1).transpose(-1, -2)
    return _product_of_activations(call, x, call.cov(0), w.transpose(-1, -2), vw, 1.0, parameter(call, 2), 1.0)


@register(aten.addmm.default, aten.mm.default, param_kinds=PARAM_KINDS)
def addmm(call: RuleCall) -> torch.Tensor:
    """beta * b + alpha * (x @ y) (addmm) and x @ y (mm); y is the weight (Din, Dout)."""
    if call.op is aten.mm.default:
        x_index, bias, beta, alpha = 0, None, 1.0, 1.0
    else:
        x_index, bias = 1, parameter(call, 0)
        beta, alpha = float(call.kwargs.get("beta", 1)), float(call.kwargs.get("alpha", 1))
    x, y = call.arg(x_index), call.arg(x_index + 1)
    if _is_param(call, x_index + 1) or call.cov(x_index + 1) is None:
        weight = transposed_weight(parameter(call, x_index + 1))
        return affine(call, x, y.t(), weight, bias, alpha, beta)
    return _product_of_activations(call, x, call.cov(x_index), y, call.cov(x_index + 1), alpha, bias, beta)


@register(aten.matmul.default, aten.bmm.default, param_kinds=PARAM_KINDS)
def matmul(call: RuleCall) -> torch.Tensor:
    """x @ y. With a 2-D y it is a linear layer; batched products of activations are diag only."""
    x, y = call.arg(0), call.arg(1)
    if y.dim() == 2 and (_is_param(call, 1) or call.cov(1) is None):
        return affine(call, x, y.t(), transposed_weight(parameter(call, 1)), None)
    return _product_of_activations(call, x, call.cov(0), y, call.cov(1), 1.0, None, 1.0)


def _product_of_activations(call: RuleCall, x, vx, y, vy, alpha: float, bias: Param, beta: float) -> torch.Tensor:
    """Variance of x @ y when y is an activation, batched, or x a diagonal parameter.

    With one uncertain operand the product is linear in it (attention weights times values),
    so its linearisation is exact in full covariance too; two uncertain operands are diag only.
    """
    if call.structure == "full":
        if vx is None or vy is None:
            return linearised_full(call)
        if y.dim() != 2:
            raise ValueError(f"{call.op}: full covariance of a batched product is not supported; use diag")
        raise ValueError(f"{call.op}: full covariance when both operands are activations is not supported")
    for kind in call.kinds:
        if isinstance(kind, str) and kind.startswith("param") and kind != "param_diag":
            raise ValueError(
                f"{call.op}: a '{kind}' posterior is supported on a 2-D weight used as x @ W only"
            )
    var = alpha**2 * contraction_variance(x, vx, y, vy, call.second_order)
    var_b = None if bias is None else bias_variance(*bias)
    return torch.broadcast_to(var if var_b is None else var + beta**2 * var_b, call.out.shape)


#: Affine ops whose covariance can be narrowed to some output features (the last dim of the output):
#: op -> (index of the weight argument, the weight's output-feature dim, index of the bias or None).
OUTPUT_FEATURES = {
    aten.linear.default: (1, 0, 2),
    aten.addmm.default: (2, 1, 0),
    aten.mm.default: (1, 1, None),
    aten.matmul.default: (1, 1, None),
}


def narrowed_affine(args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options, batch, op,
                    columns: slice) -> torch.Tensor:
    """The diagonal covariance of an affine op over output features ``columns`` only, by the op's rule.

    Its arguments are a rule node's (see the pair pass), then the op and the
    columns. The pruning pass calls this where no reader reads the other
    features (a fused query/key/value projection under the paper's attention
    rule, whose queries and keys are taken at their means), sparing their
    variance GEMMs. The other features hold NaN: nothing may read them, and
    were something to, the result would say so rather than be quietly wrong.
    """
    weight, dim, bias = OUTPUT_FEATURES[op]
    feature = (slice(None),) * dim + (columns,)
    args, covs = list(args), list(covs)
    args[weight] = args[weight][feature]
    covs[weight] = None if covs[weight] is None else covs[weight][feature]
    if bias is not None and bias < len(args) and isinstance(args[bias], torch.Tensor) \
            and args[bias].shape[-1] == out.shape[-1]:
        args[bias] = args[bias][..., columns]
        covs[bias] = None if covs[bias] is None else covs[bias][..., columns]
    part = RULES[op].graph_target(tuple(args), kwargs, tuple(covs), kw_covs, kinds, kw_kinds, out[..., columns],
                                  structure, options, batch)
    full = torch.full_like(out, float("nan"))
    full[..., columns] = part
    return full
