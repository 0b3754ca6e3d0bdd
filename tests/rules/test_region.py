"""Elementwise regions (an input read twice, paths rejoining) against the linearisation oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxstream
from fxstream.rules.region import elementwise_joins, region_covariance
from harness import DTYPE, randn, random_cov


def new_gelu(x):
    """GPT-2's activation as transformers writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def silu_by_hand(x):
    return x * torch.sigmoid(x)


def square_by_mul(x):
    return x * x


def cancelling(x):
    """x - tanh(x) + x^3 / 3 has slope ~ x^2 near 0: independent paths would add their variances."""
    return x - torch.tanh(x) + x**3 / 3


FUNCTIONS = [new_gelu, silu_by_hand, square_by_mul, cancelling]


def _last_join(fn, x):
    graph = make_fx(fn)(x).graph
    joins = elementwise_joins(graph)
    output = next(iter(graph.find_nodes(op="output"))).args[0]
    return joins.get(output)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_region_equals_the_linearisation_of_the_whole_function(fn, structure: str) -> None:
    x = 1.5 * randn(2, 3, 4)
    region = _last_join(fn, x)
    assert region is not None, "the rejoining op was not recognised"
    full = random_cov(x, 0.01, seed=1)
    cov = full if structure == "full" else torch.diagonal(full, dim1=1, dim2=2).reshape(x.shape)
    got = region_covariance((region.function(), x), {}, (None, cov), {}, (None, structure), {}, fn(x), structure)
    per_sample = [torch.func.jacrev(fn)(x[b]).reshape(x[b].numel(), -1) for b in range(x.shape[0])]
    expected = torch.stack([j @ s @ j.T for j, s in zip(per_sample, full)])
    if structure == "diag":
        expected = torch.diagonal(expected, dim1=1, dim2=2).reshape(x.shape)
    torch.testing.assert_close(got, expected)


def test_independent_operands_are_not_a_region() -> None:
    """h + W h (a residual through a linear layer) joins two paths, but not elementwise ones: per-op rules stay."""
    weight = torch.randn(4, 4)
    graph = make_fx(lambda h: h + torch.tanh(h @ weight))(torch.randn(2, 4)).graph
    assert elementwise_joins(graph) == {}


class _HandWrittenGelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 8)
        with torch.no_grad():
            self.linear.weight.mul_(3)  # pre-activations ~ 1, where the two paths of new_gelu matter

    def forward(self, x):
        return new_gelu(self.linear(x))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_streamlined_hand_written_gelu_equals_linearised_predictive(structure: str) -> None:
    torch.manual_seed(0)
    model = _HandWrittenGelu().to(DTYPE).eval()
    x = randn(16, 6)
    variance = 1e-5
    posterior = fxstream.Diagonal({"linear.weight": torch.full_like(model.linear.weight, variance)})
    predictive = fxstream.streamline(model, posterior, activation_cov=structure)(x)
    hidden = model.linear(x)
    slope = torch.func.vmap(torch.func.grad(new_gelu))(hidden.reshape(-1)).reshape(hidden.shape)
    expected = slope.square() * variance * x.square().sum(-1, keepdim=True)
    torch.testing.assert_close(predictive.var, expected)
