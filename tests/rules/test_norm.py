"""Eval-mode batch norm: an affine map per channel, exact moments with an uncertain scale."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
maps, features = randn(2, 3, 3, 3, seed=1), randn(4, 3, seed=2)
gamma, beta = randn(3, seed=3), randn(3, seed=4)
running_mean, running_var = randn(3, seed=5), rand(3, seed=6)


def batch_norm(x, weight, bias, training=False):
    return (x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, True)


SAMPLES = [
    Sample(aten.batch_norm.default, batch_norm(act(maps, 0.5), param(gamma, 0.5), param(beta)), exact=True,
           monte_carlo=True, name="maps"),
    Sample(aten.batch_norm.default, batch_norm(act(features), param(gamma), param(beta)), exact=True,
           name="features"),
    Sample(aten.batch_norm.default, batch_norm(maps, param(gamma), param(beta)), exact=True, name="params-only"),
    Sample(aten.batch_norm.default, batch_norm(act(maps), gamma, beta), name="input-only"),
    Sample(aten.batch_norm.default, batch_norm(act(maps), None, None), name="no-affine"),
    Sample(aten._native_batch_norm_legit_no_training.default,
           (act(maps, 0.5), param(gamma, 0.5), param(beta), running_mean, running_var, 0.1, 1e-5), exact=True,
           monte_carlo=True, name="functional"),
    Sample(aten._native_batch_norm_legit_no_training.default,
           (act(features), None, None, running_mean, running_var, 0.1, 1e-5), name="functional-no-affine"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_training_mode_is_declined() -> None:
    problem = capability_problem(Sample(aten.batch_norm.default, batch_norm(act(maps), gamma, beta, training=True)))
    assert "model.eval" in problem
    assert capability_problem(Sample(aten.batch_norm.default, batch_norm(act(maps), gamma, beta))) is None
