"""Sums, differences, products and quotients: linearisation oracle, exact second order for products."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
x, y = randn(3, 4, seed=1), randn(3, 4, seed=2)
row = randn(4, seed=3)
column = randn(3, 1, seed=5)  # one value per sample, broadcast over features (an RMSNorm statistic)
away_from_zero = rand(3, 4, low=1.0, high=2.0, seed=4)

SAMPLES = [
    Sample(aten.minimum.default, (act(x), act(y))),
    Sample(aten.minimum.default, (act(x), torch.zeros((), dtype=x.dtype)), name="against-zero"),
    Sample(aten.maximum.default, (act(x), act(column))),
    Sample(aten.fmin.default, (x, act(y))),
    Sample(aten.fmax.default, (act(x), y)),
    Sample(aten.add.Tensor, (act(x), act(y)), name="residual"),
    Sample(aten.add.Tensor, (act(x), param(row)), {"alpha": 2.0}, name="bias-alpha"),
    Sample(aten.add.Tensor, (act(x), y), name="deterministic"),
    Sample(aten.add.Tensor, (param(x), param(y)), structures=("param_diag",), name="param"),
    Sample(aten.sub.Tensor, (act(x), act(y)), {"alpha": 0.5}),
    Sample(aten.add.Scalar, (act(x), 2.0)),
    Sample(aten.sub.Scalar, (act(x), 2.0)),
    Sample(aten.rsub.Scalar, (act(x), 1.0)),
    Sample(aten.rsub.Scalar, (act(x), 1.0, 3.0), name="alpha"),
    Sample(aten.rsub.Tensor, (act(x), act(y)), {"alpha": 2.0}),
    Sample(aten.neg.default, (act(x),)),
    Sample(aten.mul.Tensor, (act(x), y), name="deterministic"),
    Sample(aten.mul.Tensor, (x, act(y)), name="deterministic-first"),
    Sample(aten.mul.Tensor, (act(x, 1.0), act(y, 1.0)), exact=True, monte_carlo=True, name="two-uncertain"),
    Sample(aten.mul.Tensor, (act(x, 1.0), param(row, 1.0)), exact=True, monte_carlo=True,
           name="activation-parameter"),
    Sample(aten.mul.Tensor, (act(x, 1.0), act(column, 1.0)), exact=True, name="broadcast-statistic"),
    Sample(aten.mul.Tensor, (act(column, 1.0), param(row, 1.0)), exact=True, name="broadcast-activation-parameter"),
    Sample(aten.mul.Tensor, (param(x), 3.0), structures=("param_diag",), name="param"),
    Sample(aten.mul.Scalar, (act(x), -3.0)),
    Sample(aten.div.Tensor, (act(x), away_from_zero), name="deterministic"),
    Sample(aten.div.Tensor, (act(x), act(away_from_zero)), name="two-uncertain"),
    Sample(aten.div.Scalar, (act(x), 4.0)),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_full_product_broadcasting_an_activation_across_samples_is_declined() -> None:
    """A factor with one sample broadcast over three has no per-sample covariance to carry."""
    shared = Sample(aten.mul.Tensor, (act(x), act(row[None])))
    assert "activation_cov='diag'" in capability_problem(shared, "full")
    assert capability_problem(shared, "diag") is None
    assert capability_problem(shared, "full", {"products": "linearised"}) is None  # no second-order term to form
    assert capability_problem(Sample(aten.mul.Tensor, (act(x), act(column))), "full") is None
