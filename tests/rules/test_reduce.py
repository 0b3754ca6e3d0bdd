"""Sums and means over dimensions: variances add (sum) or add and divide by n^2 (mean); norms linearised."""

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
    Sample(aten.linalg_vector_norm.default, (act(x), 2, [-1], True), name="normalize"),
    Sample(aten.linalg_vector_norm.default, (act(x), 1, [1, 2]), name="l1"),
    Sample(aten.linalg_vector_norm.default, (act(x), 3.0, [2]), name="p3"),
    Sample(aten.linalg_vector_norm.default, (act(x),), structures=("diag",), name="all"),
    Sample(aten.linalg_vector_norm.default, (param(x), 2, [0]), structures=("diag",), name="parameter"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
