"""Sums, differences, products and quotients of tensors.

Inputs are treated as independent: a residual add drops the cross-covariance
between its branches (an approximation the docs state). The product of two
uncertain factors keeps the exact second-order term v_x v_z (option
``products="moments"``; "linearised" drops it).
"""

from __future__ import annotations

import torch

from .linearise import linearised_full, noise_product_full, sandwich
from .registry import RuleCall, arg_path, register, same_shape

aten = torch.ops.aten


def _var(call: RuleCall, index: int) -> torch.Tensor | int:
    cov = call.cov(index)
    return 0 if cov is None else cov


def _scalar(value) -> float:
    return float(value) if value is not None else 1.0


def _sum_of_activations(call: RuleCall, alpha: float) -> torch.Tensor | None:
    """C_x + alpha^2 C_y where every uncertain input is an activation of the output's shape (a residual add),
    else None. Written out, not pushed through add's JVP, whose batching reads concrete sizes: a
    lowered graph would be fixed to one batch size."""
    total = None
    for path, mean, cov, kind in call.uncertain():
        if kind != "full" or not same_shape(mean.shape, call.out.shape):
            return None
        term = cov if path == arg_path(0) else alpha**2 * cov
        total = term if total is None else total + term
    return total


@register(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, param_passthrough=True)
def add(call: RuleCall) -> torch.Tensor:
    """x + alpha * y: variances add, scaled by alpha^2 (branches independent)."""
    alpha = _scalar(call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else None))
    if call.structure == "full":
        summed = _sum_of_activations(call, alpha)
        return summed if summed is not None else linearised_full(call)
    out = call.out
    total = _var(call, 0) + alpha**2 * _var(call, 1)
    return torch.broadcast_to(total, out.shape)


@register(aten.rsub.Scalar, aten.rsub.Tensor, aten.neg.default, param_passthrough=True)
def negate(call: RuleCall) -> torch.Tensor:
    """c - x and -x: the variance is unchanged."""
    if call.structure == "full":
        return linearised_full(call)
    alpha = _scalar(call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else None))
    total = alpha**2 * call.cov(0) if call.op is not aten.neg.default else call.cov(0)
    if call.op is aten.rsub.Tensor and call.cov(1) is not None:
        total = total + call.cov(1)
    return torch.broadcast_to(total, call.out.shape)


def _product_problem(call: RuleCall) -> str | None:
    """Full covariance of two uncertain factors needs each factor's samples to be the output's samples."""
    if call.structure != "full" or not call.second_order:
        return None
    uncertain = list(call.uncertain())
    if len(uncertain) < 2:
        return None
    shape = call.out.shape
    for _, mean, _, kind in uncertain:
        if kind == "full" and mean.shape != shape and (mean.dim() != len(shape) or mean.shape[0] != shape[0]):
            return (f"full covariance of a product that broadcasts an activation of shape {tuple(mean.shape)} "
                    f"across samples (to {tuple(shape)}) is not supported; use activation_cov='diag'")
    return None


@register(aten.mul.Tensor, aten.mul.Scalar, param_passthrough=True, supports=_product_problem)
def mul(call: RuleCall) -> torch.Tensor:
    """x * z: m_x^2 v_z + m_z^2 v_x + v_x v_z for independent factors (exact moments)."""
    x, z = call.arg(0), call.arg(1)
    vx, vz = call.cov(0), call.cov(1)
    if call.structure == "full":
        cov = linearised_full(call)
        if vx is not None and vz is not None and call.second_order:
            cov = cov + _second_order_full(call)
        return cov
    total = 0
    if vx is not None:
        total = total + vx * (z.square() if isinstance(z, torch.Tensor) else float(z) ** 2)
    if vz is not None:
        total = total + vz * x.square()
    if vx is not None and vz is not None and call.second_order:
        total = total + vx * vz
    return torch.broadcast_to(total, call.out.shape)


def _second_order_full(call: RuleCall) -> torch.Tensor:
    """Cov of the noise product (x - m_x)(z - m_z) for independent x, z, per sample.

    A factor that broadcasts within a sample (an RMSNorm statistic of shape
    (B, T, 1) times x of shape (B, T, D)) first has its covariance carried to
    the output's elements through the broadcast, B S B^T.
    """
    (_, mx, sx, kx), (_, mz, sz, kz) = list(call.uncertain())
    shape = call.out.shape
    if kx == "full" and kz == "full":
        return _broadcast_full(mx, sx, shape) * _broadcast_full(mz, sz, shape)
    (ma, sa), (mp, vp) = ((mx, sx), (mz, sz)) if kx == "full" else ((mz, sz), (mx, sx))
    return noise_product_full(_broadcast_full(ma, sa, shape), mp, vp, lambda p: torch.broadcast_to(p, shape))


def _broadcast_full(mean: torch.Tensor, cov: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The per-sample covariance of ``mean`` broadcast to ``shape`` (the capability check keeps samples apart)."""
    if mean.shape == shape:
        return cov
    return sandwich(lambda h: torch.broadcast_to(h, shape), mean, cov)


@register(aten.div.Tensor, aten.div.Scalar, param_passthrough=True)
def div(call: RuleCall) -> torch.Tensor:
    """x / z linearised: v_x / m_z^2 + m_x^2 v_z / m_z^4."""
    if call.structure == "full":
        return linearised_full(call)
    x, z = call.arg(0), call.arg(1)
    vx, vz = call.cov(0), call.cov(1)
    z2 = z.square() if isinstance(z, torch.Tensor) else float(z) ** 2
    total = 0
    if vx is not None:
        total = total + vx / z2
    if vz is not None:
        total = total + vz * x.square() / z2.square()
    return torch.broadcast_to(total, call.out.shape)


@register(aten.minimum.default, aten.maximum.default, aten.fmin.default, aten.fmax.default)
def extremum(call: RuleCall) -> torch.Tensor:
    """min(x, z) / max(x, z) linearised at the means: the operand the means select carries its variance."""
    if call.structure == "full":
        return linearised_full(call)
    x, z = call.arg(0), call.arg(1)
    pick_x = x <= z if call.op in (aten.minimum.default, aten.fmin.default) else x >= z
    vx, vz = _var(call, 0), _var(call, 1)
    return torch.broadcast_to(torch.where(pick_x, vx, vz), call.out.shape)
