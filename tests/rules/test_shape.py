"""Shape and routing ops: variances move with the values, full covariances on both sides."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, randn

aten = torch.ops.aten
x, y = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
empty = randn(2, 3, 0, seed=5)  # Phi-3's pass-through half of a rotary embedding over the whole head
column, matrix = randn(2, 1, 3, seed=3), randn(3, 4, seed=4)



def copied(destination: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """aten.copy's values (autograd has no derivative for the op itself): the source in the destination's shape."""
    return torch.broadcast_to(source, destination.shape) + 0 * destination


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
    Sample(aten.copy.default, (act(x), act(y)), reference=copied),
    Sample(aten.copy.default, (x, act(randn(2, 3, 1, seed=6))), name="broadcast", reference=copied),
    Sample(aten.slice_scatter.default, (act(x), act(randn(2, 3, 2, seed=6)), 2, 1, 3)),
    Sample(aten.slice_scatter.default, (x, act(randn(2, 2, 4, seed=6)), 1, 0, 3, 2), name="into-constant"),
    Sample(aten.select_scatter.default, (act(x), act(randn(2, 4, seed=7)), 1, 1)),
    Sample(aten.diagonal_scatter.default, (act(randn(2, 3, 3, seed=8)), act(randn(2, 3, seed=9)), 0, 1, 2)),
    Sample(aten.diagonal.default, (act(randn(2, 3, 3, seed=8)), 0, 1, 2)),
    Sample(aten.index.Tensor, (act(x), [None, torch.tensor([2, 0, 2])])),
    Sample(aten.index_select.default, (act(x), 2, torch.tensor([3, 1, 1]))),
    Sample(aten.gather.default, (act(x), 2, torch.tensor([[[0, 3], [1, 1], [2, 0]]] * 2))),
    Sample(aten.index_put.default, (act(x), [None, torch.tensor([0, 2])], act(randn(2, 2, 4, seed=10)))),
    Sample(aten.index_put.default, (act(x), [None, torch.tensor([0, 0])], act(randn(2, 2, 4, seed=10)), True),
           name="accumulate"),
    Sample(aten.roll.default, (act(x), [1, -1], [1, 2])),
    Sample(aten.flip.default, (act(x), [2])),
    Sample(aten.repeat.default, (act(x), [1, 2, 1])),
    Sample(aten.t.default, (param(matrix),), structures=("param_diag",), name="parameter"),
    Sample(aten.view.default, (param(matrix), [12]), structures=("param_diag",), name="parameter"),
    Sample(aten.cat.default, ([param(matrix), param(matrix)],), structures=("param_diag",), name="parameter"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
