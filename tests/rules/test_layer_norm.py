"""layer_norm under the paper's default rule: statistics from the mean input, held constant.

The reference computes mean and std from the detached input, the function the
paper's rule linearises; with only the affine parameters uncertain the op is
linear in them and the rule is exact. norm="linearised" is checked in
tests/test_transformers_rules.py.
"""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, randn

aten = torch.ops.aten
x = randn(2, 3, 4, seed=1)
gamma, beta = randn(4, seed=2), randn(4, seed=3)
gamma2, beta2 = randn(3, 4, seed=4), randn(3, 4, seed=5)


def fixed_statistics(h, shape, weight=None, bias=None, eps=1e-5, *args):
    dims = tuple(range(-len(shape), 0))
    mu = h.detach().mean(dims, keepdim=True)
    std = (h.detach().var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    out = (h - mu) / std
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


def statistics_of(mean_input):
    """layer_norm with the statistics of ``mean_input`` as constants: bilinear in (input, weight), so the
    harness's exact second-order oracle applies when both are uncertain (the paper's rule, x and gamma)."""

    def reference(h, shape, weight=None, bias=None, eps=1e-5, *args):
        dims = tuple(range(-len(shape), 0))
        mu = mean_input.mean(dims, keepdim=True)
        std = (mean_input.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
        out = (h - mu) / std
        out = out if weight is None else out * weight
        return out if bias is None else out + bias

    return reference


SAMPLES = [
    Sample(aten.layer_norm.default, (act(x), [4], gamma, beta, 1e-5), reference=fixed_statistics, name="input"),
    Sample(aten.layer_norm.default, (act(x), [3, 4], gamma2, beta2, 1e-3), reference=fixed_statistics,
           name="two-dims"),
    Sample(aten.layer_norm.default, (act(x), [4]), reference=fixed_statistics, name="no-affine"),
    Sample(aten.layer_norm.default, (x, [4], param(gamma), param(beta), 1e-5), reference=fixed_statistics,
           exact=True, name="params-only"),
    # x and gamma both uncertain: the term v_x v_gamma / std^2 is 2-8% of the variance, which a Monte Carlo bound
    # could not resolve; the exact oracle (J S J^T plus the second-order term) checks it to float precision.
    Sample(aten.layer_norm.default, (act(x, 0.5), [4], param(gamma, 0.5), param(beta), 1e-5),
           reference=statistics_of(x.double()), exact=True, monte_carlo=True, name="input-and-params"),
    Sample(aten.layer_norm.default, (act(x, 0.5), [3, 4], param(gamma2, 0.5), param(beta2), 1e-3),
           reference=statistics_of(x.double()), exact=True, name="input-and-params-two-dims"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
