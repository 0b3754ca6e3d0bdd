"""Gated products (gates="linearised"): the factors' cross term against jacrev, and the predictive against the
exact linearisation (and Monte Carlo for the second-order term) where diagonal activations lose nothing else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxstream
from fxstream.rules import mean_only_nodes
from fxstream.rules.gates import product_joins
from harness import DTYPE, node_values, rand, randn

D, K = 4, 6


def rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)



def swiglu_factors(h, w_gate, w_up, norm=rms_norm):
    """Llama's gate and up factors from a hand-written RMS norm of h (the fork: the norm's output)."""
    x = norm(h)
    return F.silu(F.linear(x, w_gate)), F.linear(x, w_up)


def geglu_factors(h, w_gate, w_up, norm=lambda h: F.layer_norm(h, (D,))):
    """gelu(x W_g^T) and a squashed up projection, from a layer norm of h."""
    x = norm(h)
    return F.gelu(F.linear(x, w_gate)), torch.tanh(F.linear(x, w_up) + 0.5)


def own_input_factors(h, w_gate, w_up, norm=lambda h: h):
    """One factor is the fork itself: h * sigmoid(h W^T) with a square W."""
    return h, torch.sigmoid(F.linear(norm(h), w_up))


FACTORS = [swiglu_factors, geglu_factors, own_input_factors]


@pytest.mark.parametrize("factors", FACTORS, ids=lambda f: f.__name__)
def test_cross_term_equals_jacrev(factors) -> None:
    """diag(J_a diag(v) J_b^T) from the forms equals the Jacobians' own (J in the fork: the norm's output)."""
    h, v = 2 * randn(2, 3, D, seed=1), rand(2, 3, D, seed=2)
    w_gate, w_up = randn(K, D, seed=3), randn(D if factors is own_input_factors else K, D, seed=4)
    graph_module = make_fx(lambda h, a, b: torch.mul(*factors(h, a, b)), pre_dispatch=True)(h, w_gate, w_up)
    held = mean_only_nodes(graph_module.graph, {"norm": "paper", "attention": "paper"})
    joins = product_joins(graph_module.graph, held, "paper")
    output = next(iter(graph_module.graph.find_nodes(op="output"))).args[0]
    join = joins.get(output)
    assert join is not None, "the gated product was not recognised"
    values = node_values(graph_module, h, w_gate, w_up)
    got = join.gate.covariance_diagonal(tuple(values[n] for n in join.inputs), v)

    fork = values[join.fork]
    torch.testing.assert_close(fork, factors.__defaults__[0](h))  # the fork is the norm's output
    j_a, j_b = torch.func.jacrev(lambda x: factors(x, w_gate, w_up, norm=lambda x: x))(fork)
    n = h.numel()
    expected = (j_a.reshape(-1, n) * v.reshape(1, n) * j_b.reshape(-1, n)).sum(1).reshape(got.shape)
    torch.testing.assert_close(got, expected)


class SwiGLU(torch.nn.Module):
    """silu(x W_g^T) * (x W_u^T) of the input, with biases: each gate unit reads every input feature."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = torch.nn.Linear(D, K, dtype=DTYPE), torch.nn.Linear(D, K, dtype=DTYPE)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)


def test_linearised_gate_equals_the_linearised_predictive() -> None:
    """Input noise and every weight Bayesian, first order: the diagonal of J Sigma J^T (jacrev in the input
    and the parameters), which the gate's output has exactly under diagonal input covariance."""
    torch.manual_seed(0)
    model = SwiGLU().eval()
    x, input_var = randn(5, D, seed=5), 1e-3 * (1 + rand(5, D, seed=6))
    params = dict(model.named_parameters())
    weight_var = {name: 1e-4 * (1 + rand(*p.shape, seed=7 + i)) for i, (name, p) in enumerate(params.items())}

    def output(x_, p_):
        return torch.func.functional_call(model, p_, (x_,))

    jx, jp = torch.func.jacrev(output, argnums=(0, 1))(x, {k: p.detach() for k, p in params.items()})
    expected = torch.einsum("bkcd,cd,bkcd->bk", jx, input_var, jx)
    for name, jac in jp.items():
        expected = expected + (jac.square() * weight_var[name]).flatten(2).sum(-1)
    got = fxstream.streamline(model, fxstream.Diagonal(weight_var), input_var=input_var, products="linearised",
                              gates="linearised", backend="eager")(x).var
    torch.testing.assert_close(got, expected)
    independent = fxstream.streamline(model, fxstream.Diagonal(weight_var), input_var=input_var,
                                      products="linearised", backend="eager")(x).var
    assert not torch.allclose(independent, expected, rtol=1e-2)


def test_second_order_term_agrees_with_monte_carlo() -> None:
    """A bilinear gate (x W_g^T) * (x W_u^T) with Gaussian input noise: its output moments are exactly
    m_b^2 v_a + m_a^2 v_b + v_a v_b + 2 m_a m_b c + c^2 (products="moments"); Monte Carlo within 4 SE."""

    class Bilinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up = torch.nn.Linear(D, K, dtype=DTYPE), torch.nn.Linear(D, K, dtype=DTYPE)

        def forward(self, x):
            return self.gate(x) * self.up(x)

    torch.manual_seed(1)
    model = Bilinear().eval()
    x, input_var = randn(2, D, seed=8), 0.3 * rand(2, D, seed=9)
    got = fxstream.streamline(model, input_var=input_var, gates="linearised", backend="eager")(x).var
    samples = 200_000
    noise = torch.randn(samples, *x.shape, generator=torch.Generator().manual_seed(10), dtype=DTYPE)
    with torch.no_grad():
        drawn = model(x + input_var.sqrt() * noise)
    reference = drawn.var(0)
    centred = drawn - drawn.mean(0)
    se = ((centred.pow(4).mean(0) - reference.square()) / samples).sqrt()
    assert ((got - reference).abs() <= 4 * se).all(), ((got - reference).abs() / se).max()
    independent = fxstream.streamline(model, input_var=input_var, backend="eager")(x).var
    assert ((independent - reference).abs() > 4 * se).any()


def test_squeeze_and_excitation_keeps_the_independent_product() -> None:
    """x * sigmoid(W_2 relu(W_1 mean(x))): the gate reaches x through a reduction and two maps."""
    w1, w2 = randn(2, D, seed=11), randn(D, 2, seed=12)

    def squeeze_excite(x):
        return x * torch.sigmoid(F.linear(torch.relu(F.linear(x.mean(1), w1)), w2)).unsqueeze(1)

    graph = make_fx(squeeze_excite, pre_dispatch=True)(randn(2, 3, D)).graph
    assert product_joins(graph, set(), "paper") == {}
