"""laplace-torch posteriors through fxstream.from_laplace, against laplace-torch's own predictive.

Last layer only: the network is linear in the Bayesian weights, so fxstream's
probit predictive must equal laplace-torch's GLM + probit predictive (and the
regression variance its GLM f_var) to float precision, for every Hessian
structure. All layers (Kron, eigen form): Monte Carlo over laplace-torch's own
``la.sample``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import fxstream

laplace = pytest.importorskip("laplace", reason="laplace-torch is an optional extra (requirements/laplace.txt)")
Laplace = laplace.Laplace


def mlp(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def cnn(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, outputs),
    ).double()


def data(net: str, likelihood: str, n: int = 48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) if net == "mlp" else \
        torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    flat = x.reshape(n, -1)
    if likelihood == "classification":
        y = (flat[:, 0] > 0).long() + (flat[:, 1] > 0.5).long()
    else:
        y = torch.stack([flat[:, 0].sin(), flat[:, 1] * flat[:, 2]], 1)
    return x, y


def fitted(net: str, likelihood: str, structure: str, subset: str = "last_layer", **kwargs):
    model = (mlp if net == "mlp" else cnn)(3 if likelihood == "classification" else 2)
    x, y = data(net, likelihood)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = copy.deepcopy(model)
    la = Laplace(model, likelihood, subset_of_weights=subset, hessian_structure=structure, **kwargs)
    la.fit(loader)
    return model.eval(), la, x[:10]


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_last_layer_classification_equals_glm_probit(structure, net):
    model, la, x = fitted(net, "classification", structure, prior_precision=0.3, temperature=0.7)
    expected = la(x, pred_type="glm", link_approx="probit")
    pred = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="classification", backend="eager")(x)
    torch.testing.assert_close(pred.probs(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("activation_cov", ["diag", "full"])
def test_last_layer_regression_equals_glm_f_var(structure, net, activation_cov):
    model, la, x = fitted(net, "regression", structure, prior_precision=2.0, sigma_noise=0.3)
    f_mu, f_var = la(x, pred_type="glm")
    pred = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="regression",
                               sigma_noise=float(la.sigma_noise), activation_cov=activation_cov,
                               backend="eager")(x)
    torch.testing.assert_close(pred.mean, f_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.var, f_var.diagonal(dim1=1, dim2=2), rtol=1e-10, atol=1e-12)
    if activation_cov == "full":
        torch.testing.assert_close(pred.cov, f_var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_subnetwork_in_last_layer_equals_glm(structure):
    """Subnetwork Laplace over chosen entries of the last layer: exact, other entries deterministic."""
    model = mlp(2)
    x, y = data("mlp", "regression")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    total = sum(p.numel() for p in model.parameters())
    last = model[4].weight.numel() + model[4].bias.numel()
    indices = torch.arange(total - last, total)[torch.tensor([0, 2, 3, 7, 9, 11, 12, 13])]
    la = Laplace(model, "regression", subset_of_weights="subnetwork", hessian_structure=structure,
                 subnetwork_indices=indices, prior_precision=1.5)
    la.fit(loader)
    f_mu, f_var = la(x[:10], pred_type="glm")
    pred = fxstream.streamline(model.eval(), fxstream.from_laplace(la), activation_cov="full", backend="eager")(x[:10])
    torch.testing.assert_close(pred.cov, f_var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_kron_all_layers_marginals_match_laplace(net):
    """KFAC.to_diagonal (exact marginals of the eigen form) equals laplace-torch's own diagonal,
    with a layerwise prior precision: checks factor order and the conv flattening."""
    model, la, _ = fitted(net, "classification", "kron", subset="all")
    n_layers = len(la.H.eigenvalues)
    la.prior_precision = torch.linspace(0.5, 3.0, n_layers, dtype=torch.float64)
    posterior = fxstream.from_laplace(la)
    expected = la.posterior_precision.diag(exponent=-1)
    got = torch.cat([posterior.to_diagonal().variances[n].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def _mc_moments(model: nn.Module, samples: torch.Tensor, x: torch.Tensor):
    """Mean and variance of the outputs over flat parameter samples (S, P), batched with vmap."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def run(theta):
        pieces = torch.split(theta, [s.numel() for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return functional_call(model, params, (x,))

    with torch.no_grad():
        outputs = torch.cat([vmap(run)(chunk) for chunk in samples.split(2000)])
    return outputs.mean(0), outputs.var(0)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_kron_all_layers_matches_monte_carlo_over_la_sample(net):
    """All-layer KFAC (eigen form): output variances within a few percent of MC over la.sample.

    The gap is the linearisation error and shrinks with the posterior scale
    (here a prior precision of 4000); MC's own error with 40k samples is
    about 0.7%.
    """
    model, la, x = fitted(net, "classification", "kron", subset="all")
    la.prior_precision = 4000.0
    pred = fxstream.streamline(model, fxstream.from_laplace(la), activation_cov="full", backend="eager")(x)
    samples = la.sample(40000, generator=torch.Generator().manual_seed(5))
    _, mc_var = _mc_moments(model, samples, x)
    gap = (pred.var - mc_var).abs() / mc_var
    assert gap.median().item() < 0.02, f"median relative variance gap {gap.median().item():.4f}"
    assert gap.max().item() < 0.06, f"max relative variance gap {gap.max().item():.4f}"


def test_order_mismatch_names_the_parameter():
    """A posterior fitted on another architecture fails at streamline with the parameter named."""
    _, la, _ = fitted("mlp", "classification", "kron")
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    with pytest.raises(fxstream.PosteriorMismatchError, match="'4.weight'"):
        fxstream.streamline(other, fxstream.from_laplace(la), backend="eager")


def test_unfitted_laplace_is_a_clear_error():
    la = Laplace(mlp(3), "classification", subset_of_weights="all", hessian_structure="diag")
    with pytest.raises(fxstream.PosteriorMismatchError, match="la.fit"):
        fxstream.from_laplace(la)
