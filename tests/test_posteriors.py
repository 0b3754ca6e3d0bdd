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


def conv_net(dims: int, readout: bool) -> nn.Module:
    """A Conv1d or Conv3d layer (stride 2, padding 1, so patches overlap and are padded), then a linear readout."""
    torch.manual_seed(5)
    conv = {1: nn.Conv1d(2, 3, 3, stride=2, padding=1), 3: nn.Conv3d(2, 3, 2, stride=2, padding=1)}[dims]
    layers = [nn.Tanh(), conv] + ([nn.Flatten(), nn.Linear({1: 9, 3: 81}[dims], 2)] if readout else [])
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("dims", [1, 3], ids=["conv1d", "conv3d"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_structured_conv1d_and_conv3d_equal_glm(kind, dims, structure):
    """A structured posterior on a Conv1d / Conv3d weight (the im2col view): J Sigma J^T exactly. As above, with
    diagonal activations the network ends at the conv, since a readout would mix its correlated positions."""
    model = conv_net(dims, readout=structure == "full")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    posterior, sigma = layer_posterior(kind, "1.weight", "1.bias", shapes, torch.Generator().manual_seed(6), 0.05)
    x = torch.randn(3, 2, *(5,) * dims, dtype=torch.float64)
    pred = run(model, posterior, x, structure)
    j = jacobian(model, ["1.weight", "1.bias"], x)
    expected = j @ sigma @ j.transpose(1, 2)
    torch.testing.assert_close(pred.var.reshape(3, -1), expected.diagonal(dim1=1, dim2=2), rtol=1e-9, atol=1e-12)
    if structure == "full":
        torch.testing.assert_close(pred.cov, expected, rtol=1e-9, atol=1e-12)


class _MixedTokens(nn.Module):
    """A structured Bayesian linear layer on tokens, then a fixed per-sample token mixing by bmm (as P @ V)."""

    def __init__(self, mixing: torch.Tensor):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.register_buffer("mixing", mixing)

    def forward(self, x):
        return torch.bmm(self.mixing, torch.tanh(self.layer(x)))


@pytest.mark.parametrize("kind", STRUCTURES)
def test_structured_posterior_through_bmm_equals_glm(kind):
    """Full activations through bmm with a deterministic operand (linear in the Bayesian weights): exact."""
    torch.manual_seed(7)
    model = _MixedTokens(torch.rand(2, 5, 4, dtype=torch.float64)).double().eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    posterior, sigma = layer_posterior(kind, "layer.weight", "layer.bias", shapes, torch.Generator().manual_seed(8),
                                       0.05)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    pred = run(model, posterior, x, "full")
    j = jacobian(model, ["layer.weight", "layer.bias"], x)
    torch.testing.assert_close(pred.cov.reshape(2, 15, 15), j @ sigma @ j.transpose(1, 2), rtol=1e-9, atol=1e-12)


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


def _layer_sigmas(kind: str, model: nn.Module, scale: float, seed: int):
    """One posterior of ``kind`` per layer of ``model`` (combined with Mixed) and each layer's Sigma."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    parts, sigmas = [], {}
    for name in shapes:
        if name.endswith(".weight"):
            layer = name[: -len(".weight")]
            post, sigma = layer_posterior(kind, name, f"{layer}.bias", shapes, g, scale)
            parts.append(post)
            sigmas[layer] = sigma
    return Mixed(*parts), sigmas


def _sample_outputs(model: nn.Module, sigmas: dict, x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    draws = {}
    for layer, sigma in sigmas.items():
        w, b = params[f"{layer}.weight"], params[f"{layer}.bias"]
        mean = torch.cat([w.detach().flatten(), b.detach()])
        root = torch.linalg.cholesky(sigma + 1e-12 * torch.eye(len(sigma), dtype=sigma.dtype))
        flat = mean + torch.randn(count, len(mean), generator=g, dtype=sigma.dtype) @ root.t()
        draws[f"{layer}.weight"] = flat[:, : w.numel()].reshape(count, *w.shape)
        draws[f"{layer}.bias"] = flat[:, w.numel():]
    run_one = lambda p: functional_call(model, {**params, **p}, (x,))  # noqa: E731
    with torch.no_grad():
        return torch.vmap(run_one)(draws)


@pytest.mark.parametrize("kind", ["kfac", "kfac_eig", "dense_joint", "lowrank"])
def test_all_layers_match_monte_carlo(kind):
    """Every layer Bayesian (MLP), full activation covariance: within a few percent of 1e5-sample MC."""
    model = mlp()
    posterior, sigmas = _layer_sigmas(kind, model, 1e-3, seed=6)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    pred = run(model, posterior, x, "full")
    outputs = _sample_outputs(model, sigmas, x, 100_000, seed=8)
    gap = ((pred.var - outputs.var(0)).abs() / outputs.var(0)).max().item()
    assert gap < 0.03, f"max relative variance gap {gap:.4f}"


@pytest.mark.parametrize("kind", STRUCTURES)
def test_to_diagonal_is_the_exact_marginal(kind):
    model = cnn()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    posterior, sigma = layer_posterior(kind, "2.weight", "2.bias", shapes, torch.Generator().manual_seed(9), 0.1)
    diagonal = posterior.to_diagonal()
    diagonal.validate(dict(model.named_parameters()))
    got = torch.cat([diagonal.variances["2.weight"].flatten(), diagonal.variances["2.bias"]])
    torch.testing.assert_close(got, sigma.diagonal(), rtol=1e-12, atol=1e-15)


class _Matmul(nn.Module):
    """A layer written as x @ P + b, with P stored (Din, Dout): the addmm / matmul path."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x) @ self.weight + self.bias


def weight_only_posterior(kind: str, name: str, shape: tuple, g: torch.Generator, scale: float):
    """A posterior over one 2-D parameter in its stored layout, and the dense Sigma over its row-major vec."""
    rows, cols = shape
    if kind == "diag":
        v = scale * torch.rand(shape, generator=g, dtype=torch.float64)
        return Diagonal({name: v}), torch.diag(v.flatten())
    if kind == "kfac":
        first, second = spd(rows, g, scale**0.5), spd(cols, g, scale**0.5)
        return KFAC({name: (first, second)}), torch.kron(first, second)
    if kind == "kfac_eig":
        (l0, q0), (l1, q1) = torch.linalg.eigh(spd(rows, g, 1.0)), torch.linalg.eigh(spd(cols, g, 1.0))
        post = KFAC.from_eigen({name: [(q0, l0), (q1, l1)]}, 1 / scale, 2.0)
        q = torch.kron(q0, q1)
        return post, q @ torch.diag(1 / (2.0 * torch.kron(l0, l1) + 1 / scale)) @ q.t()
    if kind == "dense":
        c = spd(rows * cols, g, scale)
        return Dense({name: c}, {name: shape}), c
    d = scale * torch.rand(shape, generator=g, dtype=torch.float64)
    u = scale**0.5 * torch.randn(2, *shape, generator=g, dtype=torch.float64) / 3
    flat_u = u.reshape(2, -1)
    return LowRank({name: d}, {name: u}), torch.diag(d.flatten()) + flat_u.t() @ flat_u


@pytest.mark.parametrize("kind", ["diag", "kfac", "kfac_eig", "dense", "lowrank"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_weight_stored_transposed_equals_glm(kind, structure):
    """P (Din, Dout) used as x @ P (addmm / matmul): the posterior is read in P's own layout."""
    torch.manual_seed(10)
    model = _Matmul().eval()
    posterior, sigma = weight_only_posterior(kind, "weight", (4, 3), torch.Generator().manual_seed(11), 0.1)
    x = torch.randn(5, 4, dtype=torch.float64)
    pred = run(model, posterior, x, structure)
    j = jacobian(model, ["weight"], x)
    expected = j @ sigma @ j.transpose(1, 2)
    torch.testing.assert_close(pred.var, expected.diagonal(dim1=1, dim2=2), rtol=1e-9, atol=1e-12)
    if structure == "full":
        torch.testing.assert_close(pred.cov, expected, rtol=1e-9, atol=1e-12)


class _SharedWeight(nn.Module):
    """A weight transposed before use: only a diagonal posterior may pass through the transpose."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight.t()


def test_structured_posterior_through_a_shape_op_is_a_clear_error():
    posterior, _ = weight_only_posterior("kfac", "weight", (3, 4), torch.Generator().manual_seed(12), 0.1)
    model = _SharedWeight().eval()
    with pytest.raises(fxstream.UnsupportedOpError, match="does not accept a 'param_kfac' parameter posterior"):
        run(model, posterior, torch.randn(2, 4, dtype=torch.float64), "diag")


def test_mismatches_name_the_parameter():
    model = mlp()
    params = dict(model.named_parameters())
    eye = torch.eye(7, dtype=torch.float64)
    with pytest.raises(PosteriorMismatchError, match="'0.weight'.*sizes \\(7, 7\\)"):
        KFAC({"0.weight": (eye, eye)}).validate(params)
    with pytest.raises(PosteriorMismatchError, match="'2.weight' is in two parts"):
        Mixed(Diagonal({"2.weight": torch.ones(4, 7)}), KFAC({"2.weight": (torch.eye(4), torch.eye(7))}))
    with pytest.raises(PosteriorMismatchError, match="'4.bias'.*must be \\(3, 3\\)"):
        Dense({"4.bias": torch.eye(4)}, params)
    with pytest.raises(PosteriorMismatchError, match="non-positive"):
        KFAC.from_eigen({"4.bias": [(torch.eye(3), torch.tensor([1.0, 0.0, -2.0]))]}, 1.0)
    with pytest.raises(PosteriorMismatchError, match="one scalar"):
        KFAC.from_eigen({"4.bias": [(torch.eye(3), torch.ones(3))]}, {"4.bias": torch.ones(3)})


def test_lowrank_from_samples_is_swag():
    """SWAG's covariance: 1/2 diag(sample variance) + 1/2 D D^T / (K - 1)."""
    g = torch.Generator().manual_seed(13)
    samples = {"w": torch.randn(6, 3, 2, generator=g, dtype=torch.float64),
               "v": torch.randn(6, 4, generator=g, dtype=torch.float64)}
    post = LowRank.from_samples(samples)
    flat = torch.cat([samples["w"].reshape(6, -1), samples["v"]], 1)
    deviations = flat - flat.mean(0)
    expected = 0.5 * torch.diag(flat.var(0, unbiased=False)) + 0.5 * deviations.t() @ deviations / 5
    cov = post.covariance("w")
    u = cov.tensors[1].reshape(6, -1)
    torch.testing.assert_close(torch.diag(cov.tensors[0].flatten()) + u.t() @ u, expected[:6, :6])
    torch.testing.assert_close(post.to_diagonal().variances["v"], expected.diagonal()[6:])


@pytest.mark.inductor
def test_structured_posteriors_through_inductor_match_eager():
    """KFAC eigen form, joint Dense and LowRank in one Mixed posterior, compiled by Inductor."""
    model = mlp()
    g = torch.Generator().manual_seed(14)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    parts = [layer_posterior(kind, f"{layer}.weight", f"{layer}.bias", shapes, g, 0.01)[0]
             for kind, layer in (("kfac_eig", "0"), ("dense_joint", "2"), ("lowrank", "4"))]
    posterior = Mixed(*parts)
    x = torch.randn(4, 5, dtype=torch.float64)
    eager = run(model, posterior, x, "full")
    compiled = fxstream.streamline(model, posterior, activation_cov="full", backend="inductor")(x)
    torch.testing.assert_close(compiled.cov, eager.cov, rtol=1e-7, atol=1e-12)
