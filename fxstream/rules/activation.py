"""Elementwise nonlinearities, linearised at the mean: var * g'(mu)^2, or J S J with J = diag(g'(mu))."""

from __future__ import annotations

import torch

from .linearise import derivative, elementwise_full, zero_covariance
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
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.square.default,
    aten.pow.Tensor_Scalar,
    aten.abs.default,
    aten.hardswish.default,  # MobileNetV3
    aten.hardsigmoid.default,  # MobileNetV3's squeeze-and-excitation gate
    aten.mish.default,  # CSPDarknet
    aten.clamp.default,
    aten.clamp.Tensor,
    aten.clamp_min.default,  # F.normalize's norm.clamp_min(eps)
    aten.clamp_max.default,
    aten.reciprocal.default,
    aten.erf.default,  # BERT's hand-written GELU
    aten.sin.default,
    aten.cos.default,
    aten.log1p.default,
    aten.expm1.default,
    aten.log_sigmoid.default,  # F.logsigmoid
)


def _one_uncertain_input(call: RuleCall) -> str | None:
    """The diag rule differentiates in the first argument only: clamp's bounds must be deterministic."""
    if any(path != arg_path(0) for path, *_ in call.uncertain()):
        return (f"{call.op} with uncertain bounds is not supported; compute the bounds from deterministic "
                "tensors (or constants), or leave what they depend on out of the posterior")
    return None


@register(*ELEMENTWISE, param_passthrough=True, supports=_one_uncertain_input)
def elementwise(call: RuleCall) -> torch.Tensor:
    """g(h) ~ g(mu) + g'(mu)(h - mu): first-order Taylor expansion at the incoming mean.

    J = diag(g'(mu)): var g'(mu)^2 (diag), S scaled by g'_i g'_j (full).
    """
    x = call.arg(0)
    if call.op is aten.relu.default and call.structure != "full":  # slope 1 where x > 0, else 0: a fused mask op
        return aten.threshold_backward.default(call.cov(0), x, 0)
    slope = derivative(lambda h: call.call_with({arg_path(0): h}), x)
    if call.structure == "full":
        return elementwise_full(call.cov(0), slope)
    return call.cov(0) * slope.square()


def _not_training(call: RuleCall) -> str | None:
    if call.op is aten.dropout.default and call.arg(2):
        return "dropout in training mode is random; call model.eval() before streamlining"
    return None


@register(aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
          aten.type_as.default, aten.detach.default, param_passthrough=True, supports=_not_training,
          unread=lambda options: (1,))
def identity(call: RuleCall) -> torch.Tensor:
    """Ops that return their input's values (dropout in eval mode, copies, dtype and device casts).

    The covariance is cast to the output's dtype and device. The second argument is never read:
    ``type_as`` and ``to.other`` take only the dtype (and device) of theirs, whatever its uncertainty.
    """
    cov = call.cov(0)
    if cov is None:  # only the tensor whose dtype is copied was uncertain: the values carry none
        return zero_covariance(call)
    if not isinstance(cov, torch.Tensor):
        return cov
    cov = cov.to(dtype=call.out.dtype, device=call.out.device)
    # A copy (clone, contiguous, _to_copy) is contiguous, and functionalization follows it by _unsafe_view, which
    # needs that: a diagonal covariance (the mean's shape) is made contiguous alike.
    if call.op is not aten.detach.default and cov.shape == call.out.shape and call.out.is_contiguous():
        cov = cov.contiguous()
    return cov
