"""Shape and routing ops: variances move with the values, full covariances on both sides."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, rand, randn

aten = torch.ops.aten
x, y = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
empty = randn(2, 3, 0, seed=5)  # Phi-3's pass-through half of a rotary embedding over the whole head
column, matrix = randn(2, 1, 3, seed=3), randn(3, 4, seed=4)

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
