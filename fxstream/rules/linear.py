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

import dataclasses

import torch
import torch.fx

from .linearise import batch_size, full_to_diag, linearised_full
from .patterns import RESHAPES, TRANSPARENT
from .registry import RULES, RuleCall, register
from .weights import (
    PARAM_KINDS,
    as_tensors,
    bias_covariance,
    bias_variance,
    by_output_blocks,
    layer_problem,
    matmul_into,
    plus,
    second_moment,
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
                into: torch.Tensor | None = None, second_order: bool = True,
                blocks: torch.Tensor | None = None) -> torch.Tensor | None:
    """``into`` plus the variances of x @ w^T: input term s @ (M^2)^T plus the weight posterior's term.

    The weight term meets E[x x^T] (``second_order``) or only m m^T (first order).
    ``blocks`` (x's shape plus Din: each row's full input covariance, ``vx`` its diagonal) makes the
    input term diag(M C M^T) per row. Both GEMMs run a block of output rows at a time for a large w
    (see ``by_output_blocks``).
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
        if blocks is not None:
            m = w[rows].t().to(blocks.dtype)
            var = plus(var, ((blocks @ m) * m).sum(-2))
        elif vx is not None:
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


def row_blocks(cov: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's (token's) own block of a full per-sample covariance (B, N, N) over x (B, .., Din):
    x's shape plus Din, the covariance of that row's Din features."""
    batch, d_in = cov.shape[0], x.shape[-1]
    rows = cov.shape[-1] // d_in
    blocks = cov.reshape(batch, rows, d_in, rows, d_in).diagonal(dim1=1, dim2=3)  # (B, Din, Din, rows)
    return blocks.movedim(-1, 1).reshape(*x.shape, d_in)


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


def _is_param(call: RuleCall, index: int | None) -> bool:
    kind = call.kind(index) if index is not None else None
    return isinstance(kind, str) and kind.startswith("param")


#: op -> positions of (x, y, the added term) in x @ y (+ added); y is the weight of a layer.
OPERANDS = {
    aten.linear.default: (0, 1, 2),
    aten.addmm.default: (1, 2, 0),
    aten.mm.default: (0, 1, None),
    aten.matmul.default: (0, 1, None),
    aten.bmm.default: (0, 1, None),
    aten.baddbmm.default: (1, 2, 0),
    aten.addbmm.default: (1, 2, 0),
}
_SCALED = (aten.addmm.default, aten.baddbmm.default, aten.addbmm.default)


def _scales(call: RuleCall) -> tuple[float, float]:
    """(beta, alpha) of beta * added + alpha * (x @ y)."""
    if call.op not in _SCALED:
        return 1.0, 1.0
    return float(call.arg(3)), float(call.arg(4))


def _is_layer(call: RuleCall) -> bool:
    """Whether the call is a layer x @ W^T with W a parameter or deterministic (else a product of activations)."""
    _, y, _ = OPERANDS[call.op]
    if call.op not in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
        return False
    if call.op is aten.matmul.default and call.arg(1).dim() != 2:
        return False
    return _is_param(call, y) or call.cov(y) is None


def _linear_problem(call: RuleCall) -> str | None:
    """The posterior kinds and structures these rules cannot combine (the call's kinds decide)."""
    x, y, added = OPERANDS[call.op]
    bias_kind = call.kind(added) if _is_param(call, added) else None
    if _is_layer(call):
        weight_kind = call.kind(y) if _is_param(call, y) else None
        problem = layer_problem(weight_kind, bias_kind, transposed=call.op is not aten.linear.default)
        return None if problem is None else f"{call.op}: {problem}"
    for *_, kind in call.uncertain():
        if kind.startswith("param") and kind != "param_diag":
            return (f"{call.op}: a '{kind}' posterior is supported on a 2-D weight used as x @ W only; give this "
                    "parameter a diagonal posterior (fxstream.Diagonal or .to_diagonal())")
    if call.structure == "full" and call.cov(x) is not None and call.cov(y) is not None:
        return (f"{call.op}: full covariance of a product of two uncertain operands (a batched product such as "
                "attention scores) is not supported; use activation_cov='diag'")
    return None


def _added_activation(call: RuleCall, beta: float) -> torch.Tensor | None:
    """The covariance of beta * s for an uncertain activation s added to a layer's output (a parameter
    there is a bias, handled by :func:`affine`)."""
    index = OPERANDS[call.op][2]
    if index is None or call.cov(index) is None or _is_param(call, index):
        return None
    if call.structure == "full":
        alone = tuple(c if i == index else None for i, c in enumerate(call.covs))
        return linearised_full(dataclasses.replace(call, covs=alone, kw_covs={}))
    cov = call.cov(index)
    if call.kind(index) == "full":  # a diagonal output (output_cov="diag") of a full covariance
        cov = full_to_diag(cov, call.arg(index).shape)
    return beta**2 * cov


def affine(call: RuleCall, x, w, weight: Param, bias: Param, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Covariance of alpha * (x @ w^T) + beta * b in the call's activation structure."""
    vx = call.cov(OPERANDS[call.op][0])
    added = _added_activation(call, beta)
    if call.structure == "full":
        batch = batch_size(call)
        cov = alpha**2 * affine_full(x, vx, w, weight, batch, call.second_order)
        cov_b = None if bias is None else bias_covariance(*bias)
        if cov_b is not None:
            rows = x.numel() // (batch * x.shape[-1])
            cov = cov + bias_full(beta**2 * cov_b, rows, batch)
        return cov if added is None else cov + added
    blocks = None
    if vx is not None and call.kind(OPERANDS[call.op][0]) == "full":  # output_cov="diag": variances of full
        blocks, vx = row_blocks(vx, x), full_to_diag(vx, x.shape)
    var_b = None if bias is None else bias_variance(*bias)
    if var_b is not None and beta != 1:
        var_b = beta**2 * var_b
    if alpha == 1:
        var = affine_diag(x, vx, w, weight, var_b, call.second_order, blocks)
    else:
        body = affine_diag(x, vx, w, weight, second_order=call.second_order, blocks=blocks)
        var = var_b if body is None else plus(var_b, alpha**2 * body)
    if added is not None:
        var = added if var is None else var + added
    return torch.broadcast_to(var, call.out.shape)


def _bias(call: RuleCall) -> Param:
    """The posterior of the added term when it is a parameter (a bias), else None."""
    index = OPERANDS[call.op][2]
    return parameter(call, index) if _is_param(call, index) else None


@register(aten.linear.default, param_kinds=PARAM_KINDS, supports=_linear_problem)
def linear(call: RuleCall) -> torch.Tensor:
    """x @ W^T + b."""
    x, w = call.arg(0), call.arg(1)
    if _is_layer(call):
        return affine(call, x, w, parameter(call, 1), _bias(call))
    vw = call.cov(1).transpose(-1, -2)
    return _product_of_activations(call, x, call.cov(0), w.transpose(-1, -2), vw)


@register(aten.addmm.default, aten.mm.default, param_kinds=PARAM_KINDS, supports=_linear_problem)
def addmm(call: RuleCall) -> torch.Tensor:
    """beta * b + alpha * (x @ y) (addmm) and x @ y (mm); y is the weight (Din, Dout)."""
    x_index, y_index, _ = OPERANDS[call.op]
    beta, alpha = _scales(call)
    x, y = call.arg(x_index), call.arg(y_index)
    if _is_layer(call):
        weight = transposed_weight(parameter(call, y_index))
        return affine(call, x, y.t(), weight, _bias(call), alpha, beta)
    return _product_of_activations(call, x, call.cov(x_index), y, call.cov(y_index))


@register(aten.matmul.default, aten.bmm.default, aten.baddbmm.default, param_kinds=PARAM_KINDS,
          supports=_linear_problem)
def matmul(call: RuleCall) -> torch.Tensor:
    """x @ y (matmul, bmm) and beta * s + alpha * (x @ y) (baddbmm: ALiBi plus attention scores).

    With a 2-D y it is a linear layer; batched products of two activations are diag only.
    """
    x_index, y_index, _ = OPERANDS[call.op]
    x, y = call.arg(x_index), call.arg(y_index)
    if _is_layer(call):
        return affine(call, x, y.t(), transposed_weight(parameter(call, 1)), None)
    return _product_of_activations(call, x, call.cov(x_index), y, call.cov(y_index))


@register(aten.addbmm.default, structures=("diag",), supports=_linear_problem)
def addbmm(call: RuleCall) -> torch.Tensor:
    """beta * s + alpha * sum_b x_b @ y_b: the batch's products read disjoint entries, so their variances add.

    diag only: the sum runs over the leading dimension, which mixes what would be samples.
    """
    return _product_of_activations(call, call.arg(1), call.cov(1), call.arg(2), call.cov(2),
                                   reduce=lambda var: var.sum(0))


def _product_of_activations(call: RuleCall, x, vx, y, vy, reduce=None) -> torch.Tensor:
    """Variance of beta * s + alpha * (x @ y) when y is an activation, batched, or x a diagonal parameter.

    With one uncertain operand the product is linear in it (attention weights times values),
    so its linearisation is exact in full covariance too; two uncertain operands are diag only
    (the capability check declines them in full). The moments of x @ y are exact for independent
    x and y: the v_x @ v_y term is kept unless products="linearised".
    """
    if call.structure == "full":
        return linearised_full(call)
    beta, alpha = _scales(call)
    var = contraction_variance(x, vx, y, vy, call.second_order)
    if alpha != 1:
        var = alpha**2 * var
    if reduce is not None and isinstance(var, torch.Tensor):
        var = reduce(var)
    bias = _bias(call)
    if bias is not None:
        var = var + beta**2 * bias_variance(*bias)
    added = _added_activation(call, beta)
    if added is not None:
        var = var + added
    return torch.broadcast_to(var, call.out.shape)


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
    full = part.new_full(out.shape, float("nan"))  # the covariance's dtype, float32 for a float16 model
    full[..., columns] = part
    return full


#: ops between a linear layer and an output that move or copy elements without mixing them
_ELEMENT_MOVES = frozenset({*TRANSPARENT, *RESHAPES, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
                            aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims})
LAYERS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


def variance_only_chains(outputs: list[torch.fx.Node]) -> dict[torch.fx.Node, set[torch.fx.Node]]:
    """For output_cov="diag": per output whose value comes from a linear layer through element moves
    (views, slices, casts) read by nothing else, that layer and the nodes up to the output. Their rules
    form variances only, the layer's from its input's full covariance (see :func:`affine`)."""
    chains = {}
    for output in outputs:
        chain, node = [], output
        while isinstance(node, torch.fx.Node) and node.op == "call_function" \
                and all(user.op == "output" or (chain and user is chain[-1]) for user in node.users):
            chain.append(node)
            if node.target in LAYERS:
                chains[node] = set(chain)
                break
            if node.target not in _ELEMENT_MOVES:
                break
            node = node.args[0]
    return chains


@register(aten.bilinear.default, structures=("diag",))
def bilinear(call: RuleCall) -> torch.Tensor:
    """nn.Bilinear, y_k = x1^T W_k x2 + b_k, with x1, x2, W (diagonal posterior) and b independent: exact
    moments, the first-order terms v1 (W_k x2)^2, v2 (x1^T W_k)^2 and V_k m1^2 m2^2, and (``products="moments"``)
    every product of two or three variances, V s1 s2 with second moments s = m^2 + v and v1 W_k^2 v2."""
    x1, x2, w = call.arg(0), call.arg(1), call.arg(2)
    v1, v2, vw, vb = (call.cov(i) for i in range(4))
    second = call.second_order
    var = torch.zeros_like(call.out)
    if v1 is not None:
        var = var + torch.einsum("...ki,...i->...k", torch.einsum("kij,...j->...ki", w, x2).square(), v1)
    if v2 is not None:
        var = var + torch.einsum("...kj,...j->...k", torch.einsum("...i,kij->...kj", x1, w).square(), v2)
    if vw is not None:
        s1 = second_moment(x1, v1 if second else None)
        s2 = second_moment(x2, v2 if second else None)
        var = var + torch.einsum("...i,kij,...j->...k", s1, vw, s2)
    if second and v1 is not None and v2 is not None:
        var = var + torch.einsum("...i,kij,...j->...k", v1, w.square(), v2)
    return var if vb is None else var + vb
