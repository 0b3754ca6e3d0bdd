"""Shape and routing ops: the variances move with the values.

Every op here has a Jacobian with entries 0 or 1 (reshapes, permutations,
slices, concatenation, broadcasting), so diagonal variances travel through the
op's own JVP and full covariances through J S J^T.
"""

from __future__ import annotations

import dataclasses

import torch

from .linearise import linearised_full, routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten

# Ops that keep the entries of an uncertain parameter independent may act on a
# parameter before it meets data; broadcasting ones (expand) would copy an
# entry and so correlate the copies.
INJECTIVE = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.cat.default,
    aten.stack.default,
    aten.unflatten.int,
)
BROADCASTING = (aten.expand.default,)
MULTI_OUTPUT = (
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
)


# A variance need not share its mean's memory layout: ``clone`` makes a transposed mean
# contiguous but passes its variance on as it is, and a broadcast sum's variance is an
# expanded view. ``view`` needs strides compatible with the new shape, so the variance
# goes through ``reshape``, which views where it can and copies where it must.
LAYOUT_FREE = {aten.view.default: aten.reshape.default, aten._unsafe_view.default: aten.reshape.default}


def route(call: RuleCall) -> torch.Tensor:
    """Apply the op to the variances (diag) or on both sides of the covariance (full)."""
    if call.op in LAYOUT_FREE:
        call = dataclasses.replace(call, op=LAYOUT_FREE[call.op])
    if call.structure == "full":
        return linearised_full(call)
    return routed_variance(call)


register(*INJECTIVE, param_passthrough=True)(route)
# A parameter expanded along the batch (ViT's class token) keeps one copy per
# sample, so its entries stay independent within each sample's covariance;
# copies inside one sample are treated as independent too (diag loses nothing).
register(*BROADCASTING, param_passthrough=True)(route)


@register(*MULTI_OUTPUT, param_passthrough=True)
def route_each(call: RuleCall) -> list[torch.Tensor]:
    """Ops returning several tensors: one covariance per output, picked by getitem."""
    outputs = range(len(call.out))
    if call.structure == "full":
        return [linearised_full(call, output=lambda out, i=i: out[i]) for i in outputs]
    return [routed_variance(call, output=lambda out, i=i: out[i]) for i in outputs]
