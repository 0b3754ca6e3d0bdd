"""Resampling (``F.interpolate``, ``nn.Upsample``): linear in its input, one weight matrix per spatial dim.

Linear, bilinear, trilinear and bicubic interpolation, with or without
antialiasing, are tensor products of 1-D interpolations: y = x x_1 A_1 ... x_k A_k
along the k spatial dims, J = A_1 (x) ... (x) A_k on each map. With diagonal
activations the rule option ``interpolation`` chooses what the blended
positions are taken to be:

- "correlated" (default): perfectly correlated within each map, so the output's
  standard deviation is the interpolated standard deviation, var = (J sd)^2.
  Neighbouring positions of a feature map computed with shared weights are
  strongly correlated: on a segmentation head upsampled 8x the median error
  against Monte Carlo is 0.06 this way and 0.5 with "independent", whose
  variance dips between source pixels in a grid pattern.
- "independent": var = (J o J) v = diag(J diag(v) J^T), the diagonal rule of
  any linear map.

Either way the pieces of PyTorch's decomposition are not paired one by one: it
writes x0 + w (x1 - x0), whose pieces share inputs, and counted as independent
those would give 2.25x the variance at a bilinear midpoint. Each A_d comes from
the op itself, applied to an identity along dim d and a constant along the
others, so align_corners, scales and antialiasing weigh exactly as in the op.
With full activations the rule is J S J^T. Nearest-neighbour modes copy one
input per output: the op applied to the variances is exact.
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload

from .linearise import linear_sandwich, routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten

INTERPOLATIONS = (aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d,
                  aten.upsample_bicubic2d, aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa)
NEAREST = (aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
           aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d)


@register(*(packet.default for packet in INTERPOLATIONS), *(packet.vec for packet in INTERPOLATIONS))
def interpolate(call: RuleCall) -> torch.Tensor:
    if call.structure == "full":
        return _resampled_full(call)
    correlated = call.options["interpolation"] == "correlated"
    spread = call.cov(0).sqrt() if correlated else call.cov(0)
    spatial = spread.dim() - 2
    for dim, weights in enumerate(interpolation_matrices(call)):
        axis = dim - spatial
        spread = ((weights if correlated else weights.square()) @ spread.movedim(axis, -2)).movedim(-2, axis)
    return spread.square() if correlated else spread


@register(*(packet.default for packet in NEAREST), *(packet.vec for packet in NEAREST))
def nearest(call: RuleCall) -> torch.Tensor:
    if call.structure == "full":
        return _resampled_full(call)
    return routed_variance(call)


def _resampled_full(call: RuleCall) -> torch.Tensor:
    """J S J^T by resampling the covariance's rows and columns with the op itself (no forward-mode AD, whose
    derivative of an upsampling reads concrete sizes)."""
    x = call.arg(0)
    return linear_sandwich(lambda h: call.op(h, *call.args[1:], **call.kwargs), call.cov(0), x.shape[1:])


def interpolation_matrices(call: RuleCall) -> list[torch.Tensor]:
    """A_d (output size x input size) for each spatial dim d, from the op's ``.default`` overload.

    Dim d's input is the identity (one sample per input position); every other spatial dim is a constant of
    size 2, kept at size 2 (size 1 would do, but the antialiased kernels misweigh a size-1 dim).
    """
    x, out = call.arg(0), call.out
    spatial = x.dim() - 2
    packet = call.op.overloadpacket
    align_corners = call.arg(2)
    scales = _scales(call, spatial)
    matrices = []
    for dim in range(spatial):
        size_in, size_out = x.shape[2 + dim], out.shape[2 + dim]
        shape = [size_in, 1] + [size_in if d == dim else 1 for d in range(spatial)]
        basis = torch.eye(size_in, dtype=x.dtype, device=x.device).reshape(shape)
        basis = basis.expand([size_in, 1] + [size_in if d == dim else 2 for d in range(spatial)])
        sizes = [size_out if d == dim else 2 for d in range(spatial)]
        dim_scales = [scales[dim] if d == dim else None for d in range(spatial)]
        columns = packet.default(basis.contiguous(), sizes, align_corners, *dim_scales)
        index = tuple(slice(None) if d == dim else 0 for d in range(spatial))
        matrices.append(columns[(slice(None), 0) + index].T)
    return matrices


def _scales(call: RuleCall, spatial: int) -> list[float | None]:
    """The scale of each spatial dim the op maps coordinates with (None: from the sizes)."""
    if _is_vec(call.op):
        factors = call.arg(3)
        return list(factors) if factors is not None else [None] * spatial
    return [call.arg(3 + d) for d in range(spatial)]


def _is_vec(op: OpOverload) -> bool:
    return op._overloadname == "vec"
