"""Shape and routing ops: the variances move with the values.

Every op here has a Jacobian with entries 0 or 1 (reshapes, permutations,
slices, concatenation, broadcasting, padding, selection by a deterministic
mask), so diagonal variances travel through the op itself and full
covariances through J S J^T. An element an op sets to a constant (a pad
value, a masked fill) has variance 0, whatever the constant.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import sys

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .linearise import batch_size, linear_sandwich, linearised_full, routed_variance, zero_covariance
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
    aten.roll.default,  # Swin's shifted windows
    aten.flip.default,
    aten.channel_shuffle.default,  # nn.ChannelShuffle
    aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default,
)
# Ops that route elements by index, repeat them or write one tensor into another (what functionalization
# makes of an in-place slice assignment: copy then slice_scatter). An index may repeat, copying an entry,
# so they do not pass a parameter on as one with independent entries. Integer indices never carry
# covariance (the pair pass pairs floating-point values only).
SCATTERING = (
    aten.index.Tensor,
    aten.slice_scatter.default,
    aten.select_scatter.default,
    aten.index_put.default,
    aten.diagonal_scatter.default,
    aten.index_select.default,
    aten.gather.default,
    aten.repeat.default,
    aten.diagonal.default,
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


def _scatter_ends_at_its_size(call: RuleCall) -> RuleCall:
    """A slice_scatter whose end is the "to the end" sentinel (``x[a:] = ...``) with the dim's size as its end.

    The same op; PyTorch's vmapped JVP of it allocates an index range up to the
    end, so with symbolic sizes (a lowered dynamic graph) the sentinel overflows.
    """
    end = call.arg(4)
    if not isinstance(end, int) or end < sys.maxsize:
        return call
    base, src, dim, start, step = call.arg(0), call.arg(1), call.arg(2), call.arg(3), call.arg(5)
    return dataclasses.replace(call, args=(base, src, dim, start, base.shape[dim], step), kwargs={})


def _cat_without_empties(call: RuleCall) -> RuleCall:
    """A ``cat`` without the empty tensors it skips (GPT-2's legacy cache): the same op."""
    kept = [i for i, t in enumerate(call.arg(0)) if not statically_known_true(t.numel() == 0)]
    if len(kept) == len(call.arg(0)):
        return call
    tensors, covs, kinds = ([items[i] for i in kept] for items in (call.arg(0), call.cov(0), call.kind(0)))
    return dataclasses.replace(call, args=(tensors, call.arg(1, 0)), kwargs={}, covs=(covs,), kinds=(kinds,))


def _cat_full(call: RuleCall) -> torch.Tensor:
    """J S J^T for each input of a ``cat`` along a dim within the samples.

    ``cat`` is linear, so each input's covariance columns are folded into the batch and concatenated
    with zeros for the other inputs: no vmap, whose batching rule for ``cat`` reads concrete sizes
    (that would fix a lowered graph's shapes). Any other case (a cat along the batch, a parameter,
    samples viewed as several rows) goes through :func:`linearised_full`.
    """
    tensors, batch = call.arg(0), batch_size(call)
    dim = call.arg(1, 0) % tensors[0].dim()
    laid_out = all(statically_known_true(t.shape[0] == batch) for t in tensors)
    if dim == 0 or not laid_out or any(kind not in (None, "full") for kind in call.kind(0)):
        return linearised_full(call)

    def with_zeros(index: int, h: torch.Tensor) -> torch.Tensor:
        rows = h.shape[0]
        return aten.cat.default([h if j == index else t.new_zeros((rows, *t.shape[1:]))
                                 for j, t in enumerate(tensors)], dim)

    terms = [linear_sandwich(functools.partial(with_zeros, i), cov, tensors[i].shape[1:])
             for i, cov in enumerate(call.cov(0)) if cov is not None]
    return functools.reduce(operator.add, terms) if terms else zero_covariance(call)


def route(call: RuleCall) -> torch.Tensor:
    """Apply the op to the variances (diag) or on both sides of the covariance (full)."""
    if call.op in LAYOUT_FREE:
        call = dataclasses.replace(call, op=LAYOUT_FREE[call.op])
    if call.op is aten.slice_scatter.default:
        call = _scatter_ends_at_its_size(call)
    if call.op is aten.cat.default:
        call = _cat_without_empties(call)
        if call.structure == "full":
            return _cat_full(call)
    if call.structure == "full":
        return linearised_full(call)
    return routed_variance(call)


register(*INJECTIVE, param_passthrough=True)(route)
register(*SCATTERING)(route)
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


#: Ops that set some elements to a constant: op -> (position, schema name) of that constant.
CONSTANTS = {
    aten.pad.default: (3, "value"),
    aten.constant_pad_nd.default: (2, "value"),
    aten.masked_fill.Scalar: (2, "value"),
    aten.where.ScalarSelf: (1, "self"),
    aten.where.ScalarOther: (2, "other"),
}
#: Ops that pick each element from one input by a boolean mask: op -> position of the mask.
CONDITION = {
    aten.masked_fill.Scalar: 1,
    aten.masked_fill.Tensor: 1,
    aten.where.self: 0,
    aten.where.ScalarSelf: 0,
    aten.where.ScalarOther: 0,
}


def _deterministic_choice(call: RuleCall) -> str | None:
    """A mask must be deterministic; a parameter keeps independent entries unless padding copies them."""
    position = CONDITION.get(call.op)
    if position is not None and call.cov(position) is not None:
        return (f"{call.op} with an uncertain condition is not supported; compare deterministic tensors "
                "(or the means) to build the mask")
    mode = call.arg(2) if call.op is aten.pad.default else "constant"
    if call.structure.startswith("param") and mode != "constant":
        return (f"'{mode}' padding copies entries of an uncertain parameter, which correlates them; "
                "leave the parameter out of the posterior, or pad the activation it meets instead")
    return None


@register(*CONSTANTS, aten.masked_fill.Tensor, aten.where.self, param_passthrough=True,
          supports=_deterministic_choice)
def route_with_constants(call: RuleCall) -> torch.Tensor:
    """Padding (constant, reflect, replicate, circular), masked_fill and where with a deterministic mask.

    diag: the op on the variances, its constant (pad value, fill) replaced by 0 and deterministic
    tensor operands by zeros; full: J S J^T.
    """
    if call.structure == "full":
        return linearised_full(call)
    constant = CONSTANTS.get(call.op)
    if constant is not None:
        position, name = constant
        args, kwargs = list(call.args), dict(call.kwargs)
        zero = None if call.op is aten.pad.default else 0
        if position < len(args):
            args[position] = zero
        elif name in kwargs:
            kwargs[name] = zero
        call = dataclasses.replace(call, args=tuple(args), kwargs=kwargs)
    return routed_variance(call)


@register(aten.copy.default)
def copy(call: RuleCall) -> torch.Tensor:
    """copy(self, src): src broadcast to self's shape in self's dtype; self's values are overwritten.

    Routed as that broadcast (``copy`` itself has no forward-mode derivative for the full structure).
    """
    target, source = call.arg(0), call.arg(1)
    if call.cov(1) is None:  # a deterministic source overwrites everything uncertain
        return zero_covariance(call)
    broadcast = dataclasses.replace(call, op=aten.expand.default, args=(source, list(target.shape)), kwargs={},
                                    covs=(call.cov(1), None), kinds=(call.kind(1), None), kw_covs={}, kw_kinds={})
    return route(broadcast).to(call.out.dtype)
