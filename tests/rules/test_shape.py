"""Shape and routing ops: variances move with the values, full covariances on both sides."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
x, y = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
empty = randn(2, 3, 0, seed=5)  # Phi-3's pass-through half of a rotary embedding over the whole head
column, matrix = randn(2, 1, 3, seed=3), randn(3, 4, seed=4)
signal, image, volume = randn(2, 2, 5, seed=8), randn(2, 2, 3, 4, seed=9), randn(1, 2, 2, 3, 3, seed=10)
mask = randn(2, 3, 4, seed=11) > 0
token = randn(seed=12)  # a learned fill value (a mask token)


def copied(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """aten.copy's values, differentiably (aten.copy has no derivative): source broadcast to target's shape."""
    return torch.broadcast_to(source, target.shape).to(target.dtype)


def test_copied_is_what_aten_copy_computes() -> None:
    for target, source in ((x, column.transpose(1, 2)), (x, y), (x.float(), y)):
        torch.testing.assert_close(copied(target, source), aten.copy.default(target, source), rtol=0, atol=0)


SAMPLES = [
    Sample(aten.view.default, (act(x), [2, 12])),
    Sample(aten.reshape.default, (act(x), [2, 4, 3])),
    Sample(aten._unsafe_view.default, (act(x), [2, 12])),
    Sample(aten.flatten.using_ints, (act(x), 1)),
    Sample(aten.permute.default, (act(x), [0, 2, 1])),
    Sample(aten.transpose.int, (act(x), 1, 2)),
    Sample(aten.t.default, (act(matrix),), structures=("diag",)),
    Sample(aten.unsqueeze.default, (act(x), 2)),
    Sample(aten.squeeze.dim, (act(column), 1)),
    Sample(aten.squeeze.dims, (act(column), [1])),
    Sample(aten.squeeze.default, (act(column),)),
    Sample(aten.slice.Tensor, (act(x), 2, 1, 4, 2)),
    Sample(aten.select.int, (act(x), 1, 2)),
    Sample(aten.cat.default, ([act(x), act(y)], 1)),
    Sample(aten.cat.default, ([act(x), y], 2), name="one-uncertain"),
    Sample(aten.cat.default, ([act(x), act(empty)], 2), name="empty-part"),
    Sample(aten.cat.default, ([x, act(empty)], 2), name="only-empty-uncertain"),
    Sample(aten.stack.default, ([act(x), act(y)], 1)),
    Sample(aten.unflatten.int, (act(x), 2, [2, 2])),
    Sample(aten.expand.default, (act(column), [2, 4, 3])),
    Sample(aten.split.Tensor, (act(x), 2, 2)),
    Sample(aten.split_with_sizes.default, (act(x), [1, 2], 1)),
    Sample(aten.chunk.default, (act(x), 2, 2)),
    Sample(aten.unbind.int, (act(x), 1)),
    Sample(aten.slice_scatter.default, (x, act(randn(2, 2, 4, seed=6)), 1, 0, 3, 2), name="into-constant"),
    Sample(aten.diagonal_scatter.default, (act(randn(2, 3, 3, seed=8)), act(randn(2, 3, seed=9)), 0, 1, 2)),
    Sample(aten.diagonal.default, (act(randn(2, 3, 3, seed=8)), 0, 1, 2)),
    Sample(aten.index_select.default, (act(x), 2, torch.tensor([3, 1, 1]))),
    Sample(aten.gather.default, (act(x), 2, torch.tensor([[[0, 3], [1, 1], [2, 0]]] * 2))),
    Sample(aten.repeat.default, (act(x), [1, 2, 1])),
    Sample(aten.roll.default, (act(image), [1, -2], [2, 3])),
    Sample(aten.flip.default, (act(x), [1, 2])),
    Sample(aten.channel_shuffle.default, (act(randn(2, 4, 2, 3, seed=13)), 2)),
    Sample(aten.pixel_shuffle.default, (act(randn(1, 4, 2, 3, seed=14)), 2)),
    Sample(aten.pixel_unshuffle.default, (act(randn(1, 1, 4, 2, seed=15)), 2)),
    Sample(aten.index.Tensor, (act(x), [None, torch.tensor([2, 0, 2])]), name="repeated"),
    Sample(aten.index.Tensor, (act(x), [None, mask[0, :, 0]]), name="boolean"),
    Sample(aten.copy.default, (act(x), act(column.transpose(1, 2))), reference=copied, name="broadcast-source"),
    Sample(aten.copy.default, (x, act(y)), reference=copied, name="into-deterministic"),
    Sample(aten.copy.default, (act(x), y), reference=copied, name="deterministic-source"),
    Sample(aten.slice_scatter.default, (act(x), act(y[:, 1:3]), 1, 1, 3)),
    Sample(aten.slice_scatter.default, (act(x), y[:, :, ::2], 2, 0, 4, 2), name="deterministic-source"),
    Sample(aten.select_scatter.default, (act(x), act(y[:, 0]), 1, 2)),
    Sample(aten.index_put.default, (act(x), [None, torch.tensor([0, 2])], act(y[:, :2]))),
    Sample(aten.index_put.default, (act(x), [None, torch.tensor([1, 1])], act(y[:, :2]), True), name="accumulate"),
    Sample(aten.roll.default, (param(matrix), [1], [0]), structures=("param_diag",), name="parameter"),
    Sample(aten.pad.default, (act(image), [1, 2, 0, 1]), name="zeros"),
    Sample(aten.pad.default, (act(image), [1, 2, 0, 1], "constant", 1.5), name="constant"),
    Sample(aten.pad.default, (act(signal), [2, 1]), {"mode": "reflect"}, name="reflect-1d"),
    Sample(aten.pad.default, (act(image), [1, 2, 2, 1], "reflect"), name="reflect-2d"),
    Sample(aten.pad.default, (act(volume), [1, 1, 2, 1, 1, 0], "reflect"), name="reflect-3d"),
    Sample(aten.pad.default, (act(signal), [2, 3], "replicate"), name="replicate-1d"),
    Sample(aten.pad.default, (act(image), [1, 2, 2, 1], "replicate"), name="replicate-2d"),
    Sample(aten.pad.default, (act(volume), [1, 1, 2, 1, 1, 0], "replicate"), name="replicate-3d"),
    Sample(aten.pad.default, (act(signal), [2, 1], "circular"), name="circular-1d"),
    Sample(aten.pad.default, (act(image), [1, 2, 2, 1], "circular"), name="circular-2d"),
    Sample(aten.constant_pad_nd.default, (act(image), [1, 0, 2, 1], -2.0)),
    Sample(aten.masked_fill.Scalar, (act(x), mask, -3.0)),
    Sample(aten.masked_fill.Tensor, (act(x), mask, torch.tensor(-3.0))),
    Sample(aten.masked_fill.Tensor, (act(x), mask, param(token)), name="uncertain-fill"),
    Sample(aten.where.self, (mask, act(x), act(y))),
    Sample(aten.where.self, (mask, x, act(y)), name="one-uncertain"),
    Sample(aten.where.self, (mask[:, :1], act(x), act(column.transpose(1, 2))), name="broadcast"),
    Sample(aten.where.ScalarSelf, (mask, 2.0, act(x))),
    Sample(aten.where.ScalarOther, (mask, act(x), 0.0)),
    Sample(aten.pad.default, (param(matrix), [1, 1], "constant", 2.0), structures=("param_diag",), name="parameter"),
    Sample(aten.where.self, (mask[0], param(matrix), param(matrix.flip(0))), structures=("param_diag",),
           name="parameter"),
    Sample(aten.t.default, (param(matrix),), structures=("param_diag",), name="parameter"),
    Sample(aten.view.default, (param(matrix), [12]), structures=("param_diag",), name="parameter"),
    Sample(aten.cat.default, ([param(matrix), param(matrix)],), structures=("param_diag",), name="parameter"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


@pytest.mark.parametrize("op", [aten.view.default, aten._unsafe_view.default])
@pytest.mark.parametrize("layout", ["transposed", "broadcast"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_view_of_a_variance_laid_out_unlike_its_mean(op, layout: str, structure: str) -> None:
    """A contiguous mean whose variance is a transpose's (clone copies only the mean) or an expanded view.

    ``view`` of such a variance to the mean's new shape has no compatible strides; the rule must
    still move each variance with its value.
    """
    from fxstream.rules import RULES
    from fxstream.rules.registry import DEFAULT_RULE_OPTIONS

    mean = x.contiguous()
    if layout == "transposed":
        var = rand(2, 4, 3, seed=6).transpose(1, 2)
    else:
        var = torch.broadcast_to(rand(2, 1, 4, seed=7), (2, 3, 4))
    assert var.shape == mean.shape and not var.is_contiguous()
    out = op(mean, [2, 12])
    cov = var if structure == "diag" else torch.diag_embed(var.reshape(2, 12))
    got = RULES[op].graph_target((mean, [2, 12]), {}, (cov, None), {}, (structure, None), {}, out, structure,
                                 DEFAULT_RULE_OPTIONS)
    expected = op(var.contiguous(), [2, 12])
    if structure == "full":
        got = got.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reflect_padding_of_a_parameter_is_declined() -> None:
    """Reflection copies entries of a parameter, so they would no longer be independent."""
    problem = capability_problem(Sample(aten.pad.default, (param(matrix[None]), [1, 1], "reflect")), "param_diag")
    assert "reflect" in problem and "correlates" in problem
    assert capability_problem(Sample(aten.pad.default, (param(matrix), [1, 1])), "param_diag") is None


@pytest.mark.parametrize("op, args, position", [
    (aten.where.self, (mask, x, y), 0),
    (aten.masked_fill.Scalar, (x, mask, 0.0), 1),
])
def test_an_uncertain_condition_is_declined(op, args, position: int) -> None:
    """A boolean mask carries no covariance; were one to reach the rule, it says so instead of ignoring it."""
    from fxstream.rules import RULES
    from fxstream.rules.registry import RuleCall

    kinds = tuple("diag" if isinstance(a, torch.Tensor) else None for a in args)
    call = RuleCall(op, args, {}, kinds, {}, kinds, {}, op(*args), "diag")
    assert "uncertain condition" in RULES[op].supports(call)
    kinds = tuple(None if i == position else k for i, k in enumerate(kinds))
    assert RULES[op].supports(RuleCall(op, args, {}, kinds, {}, kinds, {}, op(*args), "diag")) is None
