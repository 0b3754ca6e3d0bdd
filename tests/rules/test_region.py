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


def rms_by_hand(x):
    """LlamaRMSNorm before its weight: a cast, the statistic over the last dimension, the join, a cast back."""
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_rms_norm_closed_form_is_the_jacobian(structure: str) -> None:
    """The RMSNorm join's covariance (diagonal plus rank one Jacobian per row; O(n) per row for diag)
    equals J S J^T with J from jacrev, per sample over all its rows."""
    from fxstream.rules.norm import rms_normalise, rms_norm_covariance

    x = randn(2, 3, 5)
    x[0, 1] *= 1e-2  # a row where eps matters
    full = random_cov(x, 0.01, seed=1)
    if structure == "diag":  # the diagonal structure carries diag(S) only: J diag(v) J^T
        full = torch.diag_embed(torch.diagonal(full, dim1=1, dim2=2))
    cov = full if structure == "full" else torch.diagonal(full, dim1=1, dim2=2).reshape(x.shape)
    fn = lambda h: rms_normalise(h, 1e-3)  # noqa: E731
    got = rms_norm_covariance((x, 1e-3), {}, (cov, None), {}, (structure, None), {}, fn(x), structure)
    per_sample = [torch.func.jacrev(fn)(x[b]).reshape(x[b].numel(), -1) for b in range(x.shape[0])]
    expected = torch.stack([j @ s @ j.T for j, s in zip(per_sample, full)])
    if structure == "diag":
        expected = torch.diagonal(expected, dim1=1, dim2=2).reshape(x.shape)
    torch.testing.assert_close(got, expected)


def test_rms_join_is_found_through_casts_and_keeps_eps() -> None:
    from fxstream.rules.patterns import rms_joins

    graph = make_fx(rms_by_hand)(randn(2, 3, 5)).graph
    joins = rms_joins(graph)
    assert len(joins) == 1
    (mul, join), = joins.items()
    assert mul.target is torch.ops.aten.mul.Tensor and join.eps == pytest.approx(1e-5)
    # The statistic over another dimension is not a per-row function of the last one.
    graph = make_fx(lambda h: h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-5))(randn(2, 3, 5)).graph
    assert rms_joins(graph) == {}


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_streamlined_rms_norm_linearised_and_paper(structure: str) -> None:
    """A linear layer then a hand-written RMSNorm: norm="linearised" is J S J^T of the whole function
    (jacrev); norm="paper" still holds the statistic at the mean (r^2 v)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6).to(DTYPE)

    class Rms(torch.nn.Module):
        def forward(self, x):
            h = linear(x)
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)

    model, x = Rms().eval(), randn(2, 3, 4)
    input_var = 0.01 * torch.rand(2, 3, 4, dtype=DTYPE)
    got = {norm: fxstream.streamline(model, input_var=input_var, activation_cov=structure, norm=norm,
                                     backend="eager")(x).var for norm in ("linearised", "paper")}
    h = linear(x).detach()
    var_h = torch.einsum("ij,btj,ij->bti", linear.weight, input_var, linear.weight).detach()
    if structure == "full":  # the whole function's Jacobian: h's correlations are carried
        jac = torch.func.vmap(torch.func.vmap(torch.func.jacrev(lambda row: model(row[None])[0])))(x).detach()
        expected = torch.einsum("btij,btj,btij->bti", jac, input_var, jac)
    else:  # diag carries var(h) only: the norm's Jacobian J diag(var_h) J^T
        jac = torch.func.vmap(torch.func.vmap(torch.func.jacrev(
            lambda row: row * torch.rsqrt(row.square().mean() + 1e-5))))(h)
        expected = torch.einsum("btij,btj,btij->bti", jac, var_h, jac)
    torch.testing.assert_close(got["linearised"], expected)
    torch.testing.assert_close(got["paper"], var_h / (h.square().mean(-1, keepdim=True) + 1e-5))
