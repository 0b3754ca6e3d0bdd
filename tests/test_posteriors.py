"""Weight-posterior structures (KFAC, KFAC eigen form, Dense, LowRank, Mixed) against exact oracles.

Every structure is checked through the same dense covariance Sigma over the
vec of the Bayesian parameters (built explicitly here, Kronecker products
included, which only a test can afford):

- last layer Bayesian: the network is linear in those weights, so the output
  covariance is J Sigma J^T (torch.func.jacrev), exactly;
- one Bayesian layer with an uncertain input x = m + L eps and no
  nonlinearity after it: the output is bilinear in (x, W), and
  Cov = J_x S J_x^T + J(m) Sigma J(m)^T + sum_r J_W(L_r) Sigma J_W(L_r)^T exactly;
- all layers Bayesian: Monte Carlo over weights drawn from the same posterior.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fxstream
from fxstream import KFAC, Dense, Diagonal, LowRank, Mixed, PosteriorMismatchError

STRUCTURES = ["diag", "kfac", "kfac_eig", "dense", "dense_joint", "lowrank", "lowrank_weight_only"]


def spd(n: int, g: torch.Generator, scale: float) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return scale * (a @ a.t() / n + 0.1 * torch.eye(n, dtype=torch.float64))


def layer_posterior(kind: str, weight: str, bias: str, shapes: dict, g: torch.Generator, scale: float):
    """A posterior of the given structure over one layer, and its dense covariance over [vec W, b]."""
    w_shape, b_shape = shapes[weight], shapes[bias]
    d_out, d_in = w_shape[0], int(torch.Size(w_shape[1:]).numel())
    n_w = d_out * d_in
    if kind == "diag":
        vw = scale * torch.rand(w_shape, generator=g, dtype=torch.float64)
        vb = scale * torch.rand(b_shape, generator=g, dtype=torch.float64)
        return Diagonal({weight: vw, bias: vb}), torch.diag(torch.cat([vw.flatten(), vb]))
    if kind == "kfac":
        b, a, c = spd(d_out, g, scale**0.5), spd(d_in, g, scale**0.5), spd(d_out, g, scale)
        post = KFAC({weight: (b, a), bias: (c,)}, shapes={weight: w_shape})
        return post, torch.block_diag(torch.kron(b, a), c)
    if kind == "kfac_eig":
        h, delta = 3.0, 1.0 / scale
        (lb, qb), (la, qa), (lc, qc) = (torch.linalg.eigh(spd(n, g, 1.0)) for n in (d_out, d_in, d_out))
        post = KFAC.from_eigen({weight: [(qb, lb), (qa, la)], bias: [(qc, lc)]}, delta, h, shapes={weight: w_shape})
        q = torch.kron(qb, qa)
        sigma_w = q @ torch.diag(1 / (h * torch.kron(lb, la) + delta)) @ q.t()
        sigma_b = qc @ torch.diag(1 / (h * lc + delta)) @ qc.t()
        return post, torch.block_diag(sigma_w, sigma_b)
    if kind == "dense":
        cw, cb = spd(n_w, g, scale), spd(d_out, g, scale)
        return Dense({weight: cw, bias: cb}, shapes), torch.block_diag(cw, cb)
    if kind == "dense_joint":
        c = spd(n_w + d_out, g, scale)
        return Dense({(weight, bias): c}, shapes), c
    if kind.startswith("lowrank"):
        rank = 3
        d = {weight: scale * torch.rand(w_shape, generator=g, dtype=torch.float64),
             bias: scale * torch.rand(b_shape, generator=g, dtype=torch.float64)}
        u = {name: scale**0.5 * torch.randn(rank, *shape, generator=g, dtype=torch.float64) / 3
             for name, shape in ((weight, w_shape), (bias, b_shape))}
        if kind == "lowrank_weight_only":
            post = Mixed(LowRank({weight: d[weight]}, {weight: u[weight]}), Diagonal({bias: d[bias]}))
            flat_u = torch.cat([u[weight].reshape(rank, -1), torch.zeros(rank, d_out, dtype=torch.float64)], 1)
        else:
            post = LowRank(d, u)
            flat_u = torch.cat([u[weight].reshape(rank, -1), u[bias]], 1)
        flat_d = torch.cat([d[weight].flatten(), d[bias]])
        return post, torch.diag(flat_d) + flat_u.t() @ flat_u
    raise ValueError(kind)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 3)
    ).double().eval()


def jacobian(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    """d f / d [vec W, b] per sample: (B, outputs, params)."""
    params = dict(model.named_parameters())

    def f(*values):
        return functional_call(model, {**params, **dict(zip(names, values))}, (x,))

    jac = jacrev(f, argnums=tuple(range(len(names))))(*(params[n] for n in names))
    batch = x.shape[0]
    return torch.cat([j.reshape(batch, -1, params[n].numel()) for j, n in zip(jac, names)], dim=-1)


def run(model, posterior, x, structure, **kwargs):
    return fxstream.streamline(model, posterior, activation_cov=structure, backend="eager", **kwargs)(x)


@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_bayesian_layer_before_linear_readout_equals_glm(kind, net, structure):
    """Only one layer Bayesian and the rest linear in it: the predictive is J Sigma J^T exactly.

    With diagonal activations a readout mixing the conv's positions would drop
    their covariance (an approximation), so there the CNN ends at the conv.
    """
    model = mlp() if net == "mlp" else cnn()
    if net == "cnn" and structure == "diag":
        model = model[:4].eval()
    layer = "4" if net == "mlp" else "2"  # the last linear layer / the second conv (a linear readout follows)
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    g = torch.Generator().manual_seed(2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    posterior, sigma = layer_posterior(kind, weight, bias, shapes, g, 0.05)
    x = torch.randn(6, 5, dtype=torch.float64) if net == "mlp" else torch.randn(6, 2, 5, 5, dtype=torch.float64)
    pred = run(model, posterior, x, structure)
    j = jacobian(model, [weight, bias], x)
    expected = j @ sigma @ j.transpose(1, 2)
    torch.testing.assert_close(pred.var, expected.diagonal(dim1=1, dim2=2), rtol=1e-9, atol=1e-12)
    if structure == "full":
        torch.testing.assert_close(pred.cov, expected, rtol=1e-9, atol=1e-12)


class _Scaled(nn.Module):
    """One Bayesian layer whose output nothing nonlinear follows (so the moments are exact)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return 2.0 * self.layer(x)


@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("net", ["linear", "conv"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_uncertain_input_meets_structured_weight(kind, net, structure):
    """x = m + L eps (diag input for the diag structure) into a structured layer: exact bilinear moments."""
    torch.manual_seed(3)
    layer = nn.Linear(4, 3) if net == "linear" else nn.Conv2d(2, 3, 2)
    model = _Scaled(layer).double().eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(4)
    posterior, sigma = layer_posterior(kind, "layer.weight", "layer.bias", shapes, g, 0.1)
    x = torch.randn(5, 4, dtype=torch.float64) if net == "linear" else torch.randn(5, 2, 3, 3, dtype=torch.float64)
    n = x[0].numel()
    if structure == "diag":
        s = torch.diag(0.1 + torch.rand(n, generator=g, dtype=torch.float64))
        pred = run(model, posterior, x, structure, input_var=s.diagonal().reshape(x.shape[1:]))
    else:
        root = torch.randn(n, n, generator=g, dtype=torch.float64) / n
        s = root @ root.t()
        pred = run(model, posterior, x, structure, input_cov=s)
    names = ["layer.weight", "layer.bias"]
    params = dict(model.named_parameters())
    columns = torch.linalg.cholesky(s + 1e-30 * torch.eye(n, dtype=torch.float64)).t().reshape(n, *x.shape[1:])
    j_mean = jacobian(model, names, x)
    j_noise = jacobian(model, names, columns)  # J_[W,b](L_r); its bias part is dropped below
    j_noise[..., params["layer.weight"].numel():] = 0
    j_x = jacrev(lambda h: model(h).sum(0))(x).reshape(-1, x.shape[0], n).permute(1, 0, 2)
    expected = j_x @ s @ j_x.transpose(1, 2) + j_mean @ sigma @ j_mean.transpose(1, 2)
    expected = expected + (j_noise @ sigma @ j_noise.transpose(1, 2)).sum(0)
    torch.testing.assert_close(pred.var.reshape(x.shape[0], -1), expected.diagonal(dim1=1, dim2=2),
                               rtol=1e-9, atol=1e-12)
    if structure == "full":
        torch.testing.assert_close(pred.cov.reshape(expected.shape), expected, rtol=1e-9, atol=1e-12)
