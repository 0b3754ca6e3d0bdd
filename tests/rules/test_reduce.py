"""Sums and means over dimensions: variances add (sum) or add and divide by n^2 (mean); cumulative sums route;
norms, standard deviations, variances, logsumexp and max / min over dims linearised (a max's indices carry no
covariance)."""

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
    Sample(aten.std.dim, (act(x), [-1], True, True), name="keepdim"),
    Sample(aten.std.dim, (act(x), [1, 2], False)),
    Sample(aten.std.correction, (act(x), [2]), {"correction": 0}),
    Sample(aten.std.correction, (act(x), None), structures=("diag",), name="all"),
    Sample(aten.var.dim, (act(x), [1])),
    Sample(aten.var.correction, (act(x), [-1]), {"correction": 2, "keepdim": True}),
    Sample(aten.logsumexp.default, (act(x), [-1])),
    Sample(aten.logsumexp.default, (act(x), [1, 2], True), name="keepdim"),
    Sample(aten.amax.default, (act(x), [-1])),
    Sample(aten.amax.default, (act(x), [1, 2], True), name="keepdim"),
    Sample(aten.amin.default, (act(x), [1])),
    Sample(aten.cumsum.default, (act(x), 1)),
    Sample(aten.cumsum.default, (act(x), -1), name="last"),
    Sample(aten.cosine_similarity.default, (act(x), act(randn(2, 3, 4, seed=2)), -1)),
    Sample(aten.cosine_similarity.default, (act(x), randn(1, 3, 4, seed=3)), name="one-uncertain-broadcast"),
    Sample(aten.cosine_similarity.default, (act(x), param(randn(4, seed=4)), 2), structures=("diag",),
           name="parameter-prototype"),
    Sample(aten.var_mean.correction, (act(x), [-1]), {"keepdim": True}),
    Sample(aten.std_mean.correction, (act(x), [1, 2]), {"correction": 0}),
    Sample(aten.max.dim, (act(x), 1)),
    Sample(aten.max.dim, (act(x), -1, True), name="keepdim"),
    Sample(aten.min.dim, (act(x), 2)),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
