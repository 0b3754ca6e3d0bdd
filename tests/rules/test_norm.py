"""Eval-mode batch norm (an affine map per channel, exact moments with an uncertain scale) and group norm."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
maps, features = randn(2, 3, 3, 3, seed=1), randn(4, 3, seed=2)
gamma, beta = randn(3, seed=3), randn(3, seed=4)
running_mean, running_var = randn(3, seed=5), rand(3, seed=6)
groups_in, group_gamma, group_beta = randn(2, 4, 2, 3, seed=7), randn(4, seed=8), randn(4, seed=9)
LINEARISED = {"norm": "linearised", "products": "linearised"}  # first order: the op itself is the oracle


def batch_norm(x, weight, bias, training=False):
    return (x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, True)


def statistics_of(mean: torch.Tensor):
    """group_norm with its statistics from ``mean``, held constant: the function the paper's rule linearises
    (bilinear in the input and gamma, so the exact-moment and Monte Carlo oracles apply too)."""

    def group_norm(h, groups, weight=None, bias=None, eps=1e-5, *args):
        fixed = mean.reshape(mean.shape[0], groups, -1)
        mu, std = fixed.mean(-1, keepdim=True), (fixed.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        out = ((h.reshape(fixed.shape) - mu) / std).reshape(h.shape)
        channel = (-1,) + (1,) * (h.dim() - 2)
        out = out if weight is None else out * weight.reshape(channel)
        return out if bias is None else out + bias.reshape(channel)

    return group_norm


def batch_statistics_of(mean: torch.Tensor):
    """_native_batch_norm_legit.no_stats with its per-channel statistics from ``mean``, held constant."""

    def batch_norm_no_stats(h, weight, bias, training, momentum, eps):
        dims = (0,) + tuple(range(2, mean.dim()))
        channel = (-1,) + (1,) * (h.dim() - 2)
        mu, var = mean.mean(dims, keepdim=True), mean.var(dims, unbiased=False, keepdim=True)
        inv_std = torch.rsqrt(var + eps)
        out = (h - mu) * inv_std
        out = out if weight is None else out * weight.reshape(channel)
        out = out if bias is None else out + bias.reshape(channel)
        return out, mu.reshape(-1), inv_std.reshape(-1)

    return batch_norm_no_stats


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
    Sample(aten.group_norm.default, (act(groups_in, 0.5), 2, param(group_gamma, 0.5), param(group_beta), 1e-3),
           reference=statistics_of(groups_in), exact=True, monte_carlo=True, name="grouped"),
    Sample(aten.group_norm.default, (act(groups_in), 1, group_gamma, group_beta), reference=statistics_of(groups_in),
           name="one-group"),
    Sample(aten.group_norm.default, (act(groups_in), 4), reference=statistics_of(groups_in), name="no-affine"),
    Sample(aten.group_norm.default, (act(features[:, :, None]), 3, param(gamma)),
           reference=statistics_of(features[:, :, None]), exact=True, name="no-spatial"),
    Sample(aten.group_norm.default, (groups_in, 2, param(group_gamma), param(group_beta)),
           reference=statistics_of(groups_in), exact=True, name="params-only"),
    Sample(aten._native_batch_norm_legit.no_stats, (act(maps, 0.5), param(gamma, 0.5), param(beta), True, 0.0, 1e-5),
           reference=batch_statistics_of(maps), structures=("diag",), exact=True, monte_carlo=True,
           name="batch-statistics"),
    Sample(aten._native_batch_norm_legit.no_stats, (maps[:1], param(gamma), None, True, 0.0, 1e-5),
           reference=batch_statistics_of(maps[:1]), structures=("diag",), exact=True, name="standardised-weight"),
]
# norm="linearised": through the statistics too, the op itself the reference.
LINEARISED_SAMPLES = [
    Sample(aten._native_batch_norm_legit.no_stats, (act(maps), param(gamma), param(beta), True, 0.0, 1e-5),
           structures=("diag",), name="batch-statistics"),
    Sample(aten.group_norm.default, (act(groups_in), 2, group_gamma, group_beta, 1e-3), name="grouped"),
    Sample(aten.group_norm.default, (act(groups_in), 1, param(group_gamma), param(group_beta)), name="one-group"),
    Sample(aten.group_norm.default, (act(groups_in), 4), name="no-affine"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


@pytest.mark.parametrize("sample, structure", cases(LINEARISED_SAMPLES))
def test_linearised_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure, options=LINEARISED)


def test_training_mode_is_declined() -> None:
    problem = capability_problem(Sample(aten.batch_norm.default, batch_norm(act(maps), gamma, beta, training=True)))
    assert "model.eval" in problem
    assert capability_problem(Sample(aten.batch_norm.default, batch_norm(act(maps), gamma, beta))) is None
