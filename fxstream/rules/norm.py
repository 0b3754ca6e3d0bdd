"""Normalisation layers in inference mode."""

from __future__ import annotations

import torch

from .linearise import linearised_full, noise_product_full
from .registry import RuleCall, register

aten = torch.ops.aten


@register(aten.batch_norm.default)
def batch_norm(call: RuleCall) -> torch.Tensor:
    """Eval-mode batch norm y = gamma * (x - mu_r) / sqrt(var_r + eps) + beta, an affine map per channel.

    var_y = gamma^2 v_xhat + v_gamma (xhat^2 + v_xhat) + v_beta, where xhat is the
    normalised input and v_xhat = v_x / (var_r + eps).
    """
    x, gamma, _, running_mean, running_var, training = (call.arg(i) for i in range(6))
    eps = call.arg(7)
    if training:
        raise ValueError("batch norm in training mode uses batch statistics; call model.eval() before streamlining")
    channel = (-1,) + (1,) * (x.dim() - 2)
    inv_std = torch.rsqrt(running_var + eps).reshape(channel)
    if call.structure == "full":
        cov = linearised_full(call)
        if call.cov(0) is not None and call.cov(1) is not None:
            scale = (inv_std.expand_as(x[:1])).reshape(-1)
            normalised_cov = call.cov(0) * scale[:, None] * scale[None, :]
            cov = cov + noise_product_full(normalised_cov, gamma, call.cov(1),
                                           lambda g: g.reshape(channel).expand_as(x))
        return cov
    xhat = (x - running_mean.reshape(channel)) * inv_std
    v_xhat = 0 if call.cov(0) is None else call.cov(0) * inv_std.square()
    weight = 1.0 if gamma is None else gamma.reshape(channel)
    var = v_xhat * (weight.square() if isinstance(weight, torch.Tensor) else weight)
    if call.cov(1) is not None:
        var = var + call.cov(1).reshape(channel) * (xhat.square() + v_xhat)
    if call.cov(2) is not None:
        var = var + call.cov(2).reshape(channel)
    return torch.broadcast_to(var, call.out.shape)
