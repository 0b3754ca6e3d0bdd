"""Elementwise nonlinearities, linearised at the mean: var * g'(mu)^2, or J S J with J = diag(g'(mu))."""

from __future__ import annotations

import torch

from .linearise import derivative, linearised_full
from .registry import RuleCall, arg_path, register

aten = torch.ops.aten

ELEMENTWISE = (
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.softplus.default,
    aten.elu.default,
    aten.leaky_relu.default,
    aten.hardtanh.default,
    aten.relu6.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.mish.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.square.default,
    aten.pow.Tensor_Scalar,
    aten.abs.default,
)


@register(*ELEMENTWISE, param_passthrough=True)
def elementwise(call: RuleCall) -> torch.Tensor:
    """g(h) ~ g(mu) + g'(mu)(h - mu): first-order Taylor expansion at the incoming mean."""
    if call.structure == "full":
        return linearised_full(call)
    x = call.arg(0)
    if call.op is aten.relu.default:  # slope 1 where x > 0, else 0: autograd's fused mask op
        return aten.threshold_backward.default(call.cov(0), x, 0)
    slope = derivative(lambda h: call.call_with({arg_path(0): h}), x)
    return call.cov(0) * slope.square()


def _not_training(call: RuleCall) -> str | None:
    if call.op is aten.dropout.default and call.arg(2):
        return "dropout in training mode is random; call model.eval() before streamlining"
    return None


@register(aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.detach.default, param_passthrough=True,
          supports=_not_training)
def identity(call: RuleCall) -> torch.Tensor:
    """Ops that return their input's values (dropout in eval mode, copies, dtype casts)."""
    cov = call.cov(0)
    return cov.to(call.out.dtype) if isinstance(cov, torch.Tensor) else cov
