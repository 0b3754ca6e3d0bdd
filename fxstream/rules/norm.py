"""Normalisation layers: batch norm (running or the input's own statistics), layer norm and group norm."""

from __future__ import annotations

import dataclasses

import torch

from .linearise import TensorFn, elementwise_full, linearised_full, noise_product_full, sandwich
from .registry import RuleCall, register

aten = torch.ops.aten


def _eval_mode(call: RuleCall) -> str | None:
    if call.op is aten.batch_norm.default and call.arg(5):
        return "batch norm in training mode uses batch statistics; call model.eval() before streamlining"
    return None


def _batch_norm_full(call: RuleCall, x: torch.Tensor, gamma: torch.Tensor | None, inv_std: torch.Tensor,
                     running_mean: torch.Tensor, channel: tuple[int, ...]) -> torch.Tensor:
    """Per-sample covariance of eval batch norm, written out (no JVP, so the batch size stays symbolic).

    With a = gamma / std per channel and xhat = (x - mu_r) / std, the terms are
    S_x scaled by a_i a_j; xhat_i xhat_j v_gamma and v_beta where elements i and j
    share a channel; and (second order) S_x / (std_i std_j) times v_gamma there too.
    """
    batch = x.shape[0]
    per_sample = x[0]
    same_channel = None
    if call.cov(1) is not None or call.cov(2) is not None:
        index = torch.arange(per_sample.shape[0], device=x.device).reshape(channel).expand_as(per_sample).reshape(-1)
        same_channel = index[:, None] == index[None, :]

    def shared(variance: torch.Tensor) -> torch.Tensor:  # v_c where i and j share channel c, else 0
        return same_channel * variance.reshape(-1)[index][:, None]

    cov_x, total = call.cov(0), None
    scale = inv_std if gamma is None else inv_std * gamma.reshape(channel)
    if cov_x is not None:
        total = elementwise_full(cov_x, scale.expand_as(x))
    if call.cov(1) is not None:
        xhat = ((x - running_mean.reshape(channel)) * inv_std).reshape(batch, -1)
        term = xhat[:, :, None] * xhat[:, None, :] * shared(call.cov(1))
        if cov_x is not None and call.second_order:
            term = term + elementwise_full(cov_x, inv_std.expand_as(x)) * shared(call.cov(1))
        total = term if total is None else total + term
    if call.cov(2) is not None:
        term = shared(call.cov(2)).expand(batch, -1, -1)
        total = term if total is None else total + term
    return total


@register(aten.batch_norm.default, supports=_eval_mode)
def batch_norm(call: RuleCall) -> torch.Tensor:
    """Eval-mode batch norm y = gamma * (x - mu_r) / sqrt(var_r + eps) + beta, an affine map per channel.

    var_y = gamma^2 v_xhat + v_gamma (xhat^2 + v_xhat) + v_beta, where xhat is the
    normalised input and v_xhat = v_x / (var_r + eps), evaluated as
    v_x (gamma^2 + v_gamma) / (var_r + eps) + (x - mu_r)^2 v_gamma / (var_r + eps) + v_beta.
    """
    x, gamma, _, running_mean, running_var = (call.arg(i) for i in range(5))
    eps = call.arg(7)
    channel = (-1,) + (1,) * (x.dim() - 2)
    inv_std = torch.rsqrt(running_var + eps).reshape(channel)
    if call.structure == "full":
        return _batch_norm_full(call, x, gamma, inv_std, running_mean, channel)
    # Channel-sized factors first, so each term is one pass over the activation.
    inv_var = inv_std.square()
    v_gamma = None if call.cov(1) is None else call.cov(1).reshape(channel)
    gain = 1.0 if gamma is None else gamma.reshape(channel).square()
    if v_gamma is not None and call.second_order:
        gain = gain + v_gamma
    var = None if call.cov(0) is None else call.cov(0) * (inv_var * gain)
    if v_gamma is not None:
        centred = (x - running_mean.reshape(channel)).square()
        scale = v_gamma * inv_var
        var = centred * scale if var is None else torch.addcmul(var, centred, scale)
    if call.cov(2) is not None:
        var = call.cov(2).reshape(channel) if var is None else var + call.cov(2).reshape(channel)
    return torch.broadcast_to(var, call.out.shape)


def eval_batch_norm_math(x, weight, bias, running_mean, running_var, momentum, eps):
    """``_native_batch_norm_legit_no_training`` written out, as its (y, mean, 1/std): the fused kernel's
    forward derivative fails when traced for lowering."""
    channel = (-1,) + (1,) * (x.dim() - 2)
    inv_std = torch.rsqrt(running_var + eps)
    y = (x - running_mean.reshape(channel)) * inv_std.reshape(channel)
    y = y if weight is None else y * weight.reshape(channel)
    return (y if bias is None else y + bias.reshape(channel)), running_mean, inv_std


@register(aten._native_batch_norm_legit_no_training.default, differentiable=eval_batch_norm_math)
def batch_norm_functional(call: RuleCall) -> tuple[torch.Tensor, None, None]:
    """The functionalised eval batch norm (what ``batch_norm`` becomes at capture): (y, mean, 1/std).

    y follows :func:`batch_norm`; the saved statistics come from the running
    buffers and carry no uncertainty (None).
    """
    x, gamma, beta, running_mean, running_var, momentum, eps = (call.arg(i) for i in range(7))
    as_batch_norm = dataclasses.replace(
        call, op=aten.batch_norm.default, args=(x, gamma, beta, running_mean, running_var, False, momentum, eps, True),
        kwargs={}, covs=tuple(call.covs[:5]), kinds=tuple(call.kinds[:5]), kw_covs={}, kw_kinds={}, out=call.out[0],
    )
    return batch_norm(as_batch_norm), None, None


@register(aten._native_batch_norm_legit.no_stats, structures=("diag",))
def batch_norm_batch_statistics(call: RuleCall) -> tuple[torch.Tensor, None, None]:
    """Batch norm with the input's own statistics per channel, (y, mean, 1/std): what
    ``F.batch_norm(training=True)`` without running buffers becomes, e.g. timm's weight
    standardisation (ScaledStdConv2d normalises each output channel of a kernel).

    Channel c of y is gamma_c * xhat + beta_c with xhat the layer norm of every entry
    of that channel; the terms follow :func:`layer_norm` (option ``norm``).
    """
    x, gamma, eps = call.arg(0), call.arg(1), call.arg(5)
    channels = x.shape[1]
    by_channel = lambda t: t.transpose(0, 1).reshape(channels, -1)  # noqa: E731
    back = lambda t: t.reshape((channels, x.shape[0]) + x.shape[2:]).transpose(0, 1)  # noqa: E731
    channel = (-1,) + (1,) * (x.dim() - 2)
    mu, inv_std = layer_statistics(by_channel(x), 1, eps)
    xhat = (by_channel(x) - mu) * inv_std
    v_xhat = 0
    if call.cov(0) is not None:
        v_xhat = back(_normalised_variance(xhat, by_channel(call.cov(0).expand_as(x)), inv_std, 1,
                                           call.options["norm"] == "linearised"))
    xhat = back(xhat)
    var = v_xhat * (1.0 if gamma is None else gamma.reshape(channel).square())
    if call.cov(1) is not None:
        var = var + call.cov(1).reshape(channel) * (xhat.square() + (v_xhat if call.second_order else 0))
    if call.cov(2) is not None:
        var = var + call.cov(2).reshape(channel)
    return torch.broadcast_to(var, x.shape), None, None


def layer_statistics(x: torch.Tensor, dims: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1 / sqrt(biased variance + eps) over the last ``dims`` dimensions, as layer_norm uses.

    Written for forward-mode AD with symbolic sizes (the statistics are differentiated where a rule
    takes a Jacobian in the norm's weight): ``Tensor.var``'s derivative, and that of a Tensor overload
    with a Python number, read concrete sizes and would fix a lowered graph's shapes.
    """
    reduced = tuple(range(-dims, 0))
    mu = x.mean(reduced, keepdim=True)
    inv_std = torch.rsqrt(aten.add.Scalar((x - mu).square().mean(reduced, keepdim=True), eps))
    return mu, inv_std


def _normalised_variance(xhat: torch.Tensor, var: torch.Tensor, inv_std: torch.Tensor, dims: int,
                         linearised: bool) -> torch.Tensor:
    """Variance of xhat = (x - mu) / sigma for diagonal input variance ``var``.

    Statistics held constant (the paper): var / sigma^2. Linearised through them:
    J_ij = (d_ij - (1 + xhat_i xhat_j) / n) / sigma per row, whose squared rows
    sum to  v_i (1 - 2 (1 + xhat_i^2) / n) + (S0 + 2 xhat_i S1 + xhat_i^2 S2) / n^2
    with S_k = sum_j xhat_j^k v_j.
    """
    scaled = var * inv_std.square()
    if not linearised:
        return scaled
    reduced = tuple(range(-dims, 0))
    n = xhat[(0,) * (xhat.dim() - dims)].numel()
    s0, s1, s2 = ((xhat**k * scaled).sum(reduced, keepdim=True) for k in range(3))
    return scaled * (1 - 2 * (1 + xhat.square()) / n) + (s0 + 2 * xhat * s1 + xhat.square() * s2) / n**2


def layer_norm_math(x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """``layer_norm`` written out: the kernel's forward derivative in its weight and bias fails when traced
    for lowering (a tensor that is not fake reaches the trace)."""
    mu, inv_std = layer_statistics(x, len(shape), eps)
    y = (x - mu) * inv_std
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


@register(aten.layer_norm.default, differentiable=layer_norm_math)
def layer_norm(call: RuleCall) -> torch.Tensor:
    """y = gamma * xhat + beta. norm="paper": statistics from the mean input, held constant;
    norm="linearised": the Jacobian of the norm at the mean, through its statistics.

    Weight and bias terms are exact for the product gamma * xhat of independent factors:
    var_y = gamma^2 v_xhat + v_gamma (xhat^2 + v_xhat) + v_beta.
    """
    x, gamma = call.arg(0), call.arg(2)
    eps, dims = call.arg(4), len(call.arg(1))
    linearised = call.options["norm"] == "linearised"
    mu, inv_std = layer_statistics(x, dims, eps)
    if call.structure == "full":
        return _affine_norm_full(call, lambda h: layer_norm_math(h, call.arg(1), eps=eps),
                                 torch.broadcast_to(inv_std, x.shape), lambda g: torch.broadcast_to(g, x.shape))
    xhat = (x - mu) * inv_std
    v_xhat = 0 if call.cov(0) is None else _normalised_variance(xhat, call.cov(0), inv_std, dims, linearised)
    var = v_xhat * (1.0 if gamma is None else gamma.square())
    if call.cov(2) is not None:
        var = var + call.cov(2) * (xhat.square() + (v_xhat if call.second_order else 0))
    if call.cov(3) is not None:
        var = var + call.cov(3)
    return torch.broadcast_to(var, call.out.shape)


def _affine_norm_full(call: RuleCall, normalise: TensorFn, inv_std: torch.Tensor, spread: TensorFn) -> torch.Tensor:
    """gamma * xhat + beta in full covariance: the affine parameters' terms (the op is linear in them),
    gamma Cov(xhat) gamma for the input, and the exact second-order term of gamma times xhat.

    Cov(xhat) is J S J^T through ``normalise`` (the norm without its affine part) under norm="linearised";
    under "paper" the statistics are held, so it is S scaled by ``inv_std`` (per input element) on both
    sides. ``spread`` maps a parameter of gamma's shape to the input's.
    """
    x, gamma, cov_x = call.arg(0), call.arg(2), call.cov(0)
    params_only = dataclasses.replace(call, covs=(None,) + tuple(call.covs[1:]))
    cov = linearised_full(params_only) if next(params_only.uncertain(), None) is not None else 0
    if cov_x is None:
        return cov
    if call.options["norm"] == "linearised":
        xhat_cov = sandwich(normalise, x, cov_x)
    else:
        xhat_cov = elementwise_full(cov_x, inv_std)
    if gamma is None:
        return cov + xhat_cov
    scale = spread(gamma).reshape(x.shape[0], -1)
    cov = cov + xhat_cov * scale[:, :, None] * scale[:, None, :]
    if call.cov(2) is not None and call.second_order:
        cov = cov + noise_product_full(xhat_cov, gamma, call.cov(2), spread)
    return cov


@register(aten.group_norm.default)
def group_norm(call: RuleCall) -> torch.Tensor:
    """Group norm (PoolFormer, BiT's ResNetV2): layer norm over each group of channels of a sample,
    then a per-channel gamma and beta; the same rules as :func:`layer_norm` (option ``norm``).
    """
    x, groups, gamma, eps = call.arg(0), call.arg(1), call.arg(2), call.arg(4)
    linearised = call.options["norm"] == "linearised"
    batch = x.shape[0]
    channel = (-1,) + (1,) * (x.dim() - 2)
    mu, inv_std = layer_statistics(x.reshape(batch, groups, -1), 1, eps)

    def grouped(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(batch, groups, -1)

    if call.structure == "full":
        def normalise(h: torch.Tensor) -> torch.Tensor:
            rows = grouped(h)
            return layer_norm_math(rows, rows.shape[-1:], eps=eps).reshape(h.shape)

        return _affine_norm_full(call, normalise, torch.broadcast_to(inv_std, grouped(x).shape).reshape(x.shape),
                                 lambda g: torch.broadcast_to(g.reshape(channel), x.shape))
    xhat = (grouped(x) - mu) * inv_std
    v_xhat = 0
    if call.cov(0) is not None:
        v_xhat = _normalised_variance(xhat, grouped(call.cov(0)), inv_std, 1, linearised).reshape(x.shape)
    xhat = xhat.reshape(x.shape)
    var = v_xhat * (1.0 if gamma is None else gamma.reshape(channel).square())
    if call.cov(2) is not None:
        var = var + call.cov(2).reshape(channel) * (xhat.square() + (v_xhat if call.second_order else 0))
    if call.cov(3) is not None:
        var = var + call.cov(3).reshape(channel)
    return torch.broadcast_to(var, call.out.shape)


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dimension: a hand-written RMSNorm before its weight."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rms_normalised_variance(x: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """diag(J diag(var) J^T) for y = x * r, r = (mean(x^2) + eps)^(-1/2) over the last dimension.

    Per row J = r I - (r^3 / n) x x^T (diagonal plus rank one), so with u = r x and w = r^2 var
    var_y_i = w_i (1 - 2 u_i^2 / n) + u_i^2 (sum_j u_j^2 w_j) / n^2: O(n) per row.
    """
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    u2 = (x * r).square()
    scaled = var * r.square()
    n = x.shape[-1]
    return scaled * (1 - 2 * u2 / n) + u2 * (u2 * scaled).sum(-1, keepdim=True) / n**2


def rms_norm_covariance(args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options=None, batch=None):
    """Covariance of a hand-written RMSNorm's join x * rsqrt(mean(x^2) + eps) under norm="linearised":
    the norm's Jacobian at the mean, through its statistic (see :func:`rms_normalised_variance`);
    J S J^T for full covariance. Called with the rule calling convention; ``args`` is (x, eps),
    ``covs`` (cov of x, None).
    """
    x, eps = args
    cov = covs[0]
    if structure == "full":
        return sandwich(lambda h: rms_normalise(h, eps), x, cov)
    return torch.broadcast_to(rms_normalised_variance(x, cov, eps), out.shape)


rms_norm_covariance.__name__ = rms_norm_covariance.__qualname__ = "cov_rms_norm_linearised"
