"""Residual joins (h + f(h)): the branch's Jacobian diagonal against jacrev, and the predictive against
the exact linearisation where diagonal activations lose nothing else."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxstream
from fxstream.rules import mean_only_nodes
from fxstream.rules.residual import residual_joins
from harness import DTYPE, randn

D, K = 4, 6


def layer_norm(x):
    return F.layer_norm(x, (D,))


def rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def gelu_mlp(h, w1, w2, norm=layer_norm):
    """A BERT/ViT-style MLP branch: layer norm, linear, gelu, linear."""
    return F.linear(F.gelu(F.linear(norm(h), w1)), w2)


def conv1d_mlp(h, w1, w2, norm=layer_norm):
    """GPT-2's Conv1D layers: addmm on flattened rows, viewed back; a tanh-gelu written out."""
    hidden = torch.addmm(torch.zeros(K, dtype=h.dtype), norm(h).reshape(-1, D), w1.t()).reshape(*h.shape[:-1], K)
    hidden = 0.5 * hidden * (1 + torch.tanh(0.8 * (hidden + 0.044715 * hidden**3)))
    return torch.mm(hidden.reshape(-1, K), w2.t()).reshape(h.shape)


def swiglu(h, w1, w2, w3, norm=rms_norm):
    """Llama's MLP branch: RMS norm written out, silu(x W1) * (x W3), then W2."""
    x = norm(h)
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def one_map(h, w1, w2, norm=torch.tanh):
    """A branch with one square linear map."""
    return F.linear(norm(h), w2 @ w1)


BRANCHES = [gelu_mlp, conv1d_mlp, swiglu, one_map]


def _weights(branch):
    shapes = [(K, D), (D, K), (K, D)] if branch is swiglu else [(K, D), (D, K)]
    return [randn(*s) for s in shapes]


def _values(graph_module: torch.fx.GraphModule, *args) -> dict:
    """Every node's value on ``args``."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Recorder(graph_module).run(*args)
    return values


def _held(norm, h):
    """``norm`` with its statistics held at their values for h (the paper's norm rule)."""
    if norm is layer_norm:
        mu, rstd = h.mean(-1, keepdim=True), torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return lambda x: (x - mu) * rstd
    if norm is rms_norm:
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return lambda x: x * rstd
    return norm


def _jacobian_diagonal(branch, h, weights):
    norm = _held(inspect.signature(branch).parameters["norm"].default, h)
    jacobian = torch.func.jacrev(lambda x: branch(x, *weights, norm=norm))(h)
    return jacobian.reshape(h.numel(), h.numel()).diagonal().reshape(h.shape)


@pytest.mark.parametrize("branch", BRANCHES, ids=lambda f: f.__name__)
def test_branch_jacobian_diagonal_equals_jacrev(branch) -> None:
    h, weights = 2 * randn(2, 3, D), _weights(branch)
    block = make_fx(lambda h, *w: h + branch(h, *w), pre_dispatch=True)(h, *weights)  # ops as Dynamo gives them
    held = mean_only_nodes(block.graph, {"norm": "paper", "attention": "paper"})
    joins = residual_joins(block.graph, held, "paper")
    output = next(iter(block.graph.find_nodes(op="output"))).args[0]
    join = joins.get(output)
    assert join is not None, "the residual join was not recognised"
    values = _values(block, h, *weights)
    got = join.branch.diagonal(tuple(values[n] for n in join.inputs)).reshape(h.shape)
    torch.testing.assert_close(got, _jacobian_diagonal(branch, h, weights))


def test_branches_it_cannot_carry_keep_the_independent_add() -> None:
    """A third linear map, and token mixing (attention), leave diag(J_f) out of reach: no join."""
    w = randn(D, D)

    def three_maps(h):
        return h + F.linear(torch.tanh(F.linear(torch.tanh(F.linear(h, w)), w)), w)

    def mixing(h):
        return h + torch.softmax(h @ h.transpose(-1, -2), -1) @ F.linear(h, w)

    for block in (three_maps, mixing):
        graph = make_fx(block, pre_dispatch=True)(randn(2, 3, D)).graph
        assert residual_joins(graph, set(), "paper") == {}, block.__name__


class _ResidualBlock(torch.nn.Module):
    """h + W2 tanh(W1 h), W1 a scaled permutation: every hidden unit reads its own input feature, so
    diagonal activations lose nothing inside the branch and only the skip/branch covariance is at stake."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.eye(D, dtype=DTYPE)[torch.randperm(D)] * 1.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(randn(D, D), requires_grad=False)

    def forward(self, h):
        return h + F.linear(torch.tanh(F.linear(h, self.w1)), self.w2)


def test_linearised_residual_equals_the_linearised_predictive() -> None:
    torch.manual_seed(0)
    model = _ResidualBlock().eval()
    h, variance = randn(5, D), 1e-4 * (1 + torch.rand(5, D, dtype=DTYPE))
    jacobians = torch.func.vmap(torch.func.jacrev(model))(h)
    expected = torch.einsum("bij,bj,bij->bi", jacobians, variance, jacobians)
    got = fxstream.streamline(model, input_var=variance, residual="linearised", backend="eager")(h).var
    torch.testing.assert_close(got, expected)
    independent = fxstream.streamline(model, input_var=variance, backend="eager")(h).var
    assert not torch.allclose(independent, expected, rtol=1e-2)
