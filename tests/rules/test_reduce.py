"""Sums and means over dimensions: variances add (sum) or add and divide by n^2 (mean)."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, randn

aten = torch.ops.aten
x = randn(2, 3, 4, seed=1)

SAMPLES = [
    Sample(aten.sum.default, (act(x),), structures=("diag",)),
    Sample(aten.sum.dim_IntList, (act(x), [1])),
    Sample(aten.sum.dim_IntList, (act(x), [1, 2], True), name="keepdim"),
    Sample(aten.mean.default, (act(x),), structures=("diag",)),
    Sample(aten.mean.dim, (act(x), [2])),
    Sample(aten.mean.dim, (act(x), [-1, 1], True), name="keepdim"),
    Sample(aten.sum.dim_IntList, (param(x), [0]), structures=("diag",), name="parameter"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
