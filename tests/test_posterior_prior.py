"""New priors and scales without a new fit: ``with_prior_precision`` and ``scaled`` against their oracles.

Prior precision: laplace-torch's own posterior after ``la.prior_precision = p`` (its GLM predictive for
last-layer and subnetwork posteriors, exact there; its marginal variances for all layers). Scale: the
exact marginals of each structure, and the linearised predictive, which is linear in the covariance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream
from fxstream.errors import FxstreamError, PosteriorMismatchError

laplace = pytest.importorskip("laplace", reason="laplace-torch is an optional extra (requirements/laplace.txt)")
from test_posteriors_laplace import data, fitted, mlp  # noqa: E402


def _layout(posterior: fxstream.Posterior) -> dict:
    """Structure and tensor shapes, as set_posterior compares them."""
    return {n: (posterior.covariance(n).kind, [tuple(t.shape) for t in posterior.covariance(n).tensors])
            for n in posterior.parameter_names()}


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_new_prior_of_last_layer_equals_laplace_glm(structure):
    model, la, x = fitted("mlp", "classification", structure, prior_precision=0.3, temperature=0.7)
    posterior = fxstream.from_laplace(la)
    new = posterior.with_prior_precision({"4.weight": 2.0, "4.bias": 0.7})
    assert _layout(new) == _layout(posterior)
    per_layer = torch.tensor([2.0, 0.7], dtype=torch.float64)  # Kron: per layer; the others: per entry
    la.prior_precision = per_layer if structure == "kron" else per_layer.repeat_interleave(torch.tensor([18, 3]))
    expected = la(x, pred_type="glm", link_approx="probit")
    pred = fxstream.streamline(model, new, likelihood="classification", backend="eager")(x)
    torch.testing.assert_close(pred.probs(), expected, rtol=1e-10, atol=1e-12)
    assert new.with_prior_precision(0.3).prior_precision == 0.3


def _laplace_marginals(la, structure: str) -> torch.Tensor:
    if structure == "diag":
        return la.posterior_variance
    if structure == "full":
        return la.posterior_covariance.diagonal()
    return la.posterior_precision.diag(exponent=-1)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_new_layerwise_prior_of_all_layers_matches_laplace_marginals(structure):
    model, la, _ = fitted("mlp", "regression", structure, subset="all", prior_precision=1.0, sigma_noise=0.4)
    new = fxstream.from_laplace(la).with_prior_precision({"0": 0.5, "2": 1.5, "4.weight": 3.0, "4.bias": 0.2})
    la.prior_precision = torch.tensor([0.5, 0.5, 1.5, 1.5, 3.0, 0.2], dtype=torch.float64)
    got = torch.cat([new.to_diagonal().variances[n].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, _laplace_marginals(la, structure), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_new_prior_of_subnetwork_equals_laplace_glm(structure):
    model = mlp(2)
    x, y = data("mlp", "regression")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    total = sum(p.numel() for p in model.parameters())
    indices = torch.arange(total - 14, total)[torch.tensor([0, 2, 3, 7, 9, 12, 13])]  # last layer, incl. bias
    la = laplace.Laplace(model, "regression", subset_of_weights="subnetwork", hessian_structure=structure,
                         subnetwork_indices=indices, prior_precision=1.5)
    la.fit(loader)
    new = fxstream.from_laplace(la).with_prior_precision(4.0)
    la.prior_precision = 4.0
    _, f_var = la(x[:10], pred_type="glm")
    pred = fxstream.streamline(model.eval(), new, activation_cov="full", backend="eager")(x[:10])
    torch.testing.assert_close(pred.cov, f_var, rtol=1e-10, atol=1e-12)


def test_marglik_delegates_to_laplace_and_leaves_it_as_it_was():
    _, la, _ = fitted("mlp", "regression", "kron", subset="all", prior_precision=1.0, sigma_noise=0.4)
    posterior = fxstream.from_laplace(la)
    got = posterior._marglik({"0": 0.5, "2": 1.5, "4": 3.0}, 0.3)
    expected = la.log_marginal_likelihood(torch.tensor([0.5, 0.5, 1.5, 1.5, 3.0, 3.0], dtype=torch.float64),
                                          torch.tensor(0.3, dtype=torch.float64)).item()
    la.prior_precision, la.sigma_noise = 1.0, 0.4
    assert got == pytest.approx(expected, rel=1e-12)
    posterior._marglik(7.0, None)
    assert float(la.prior_precision) == 1.0 and float(la.sigma_noise) == 0.4


def _posteriors(model: nn.Module) -> dict[str, fxstream.Posterior]:
    """One posterior of every structure over the two linear layers of ``model``."""
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())

    def spd(n):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return a @ a.t() / n + 0.1 * torch.eye(n, dtype=torch.float64)

    def rand(name):
        return 0.1 * torch.rand(params[name].shape, generator=g, dtype=torch.float64)

    names = list(params)
    diagonal = fxstream.Diagonal({n: rand(n) for n in names})
    kfac = fxstream.KFAC({"0.weight": (spd(6), spd(4)), "0.bias": (spd(6),), "2.weight": (spd(3), spd(6)),
                          "2.bias": (spd(3),)})
    def eig(n):
        values, vectors = torch.linalg.eigh(spd(n))
        return vectors, values

    eigen = fxstream.KFAC.from_eigen({"0.weight": [eig(6), eig(4)], "2.bias": [eig(3)]}, 0.5, 2.0)
    dense = fxstream.Dense({("0.weight", "0.bias"): 0.01 * spd(30), "2.weight": 0.01 * spd(18)}, params)
    lowrank = fxstream.LowRank({n: rand(n) for n in names},
                               {n: 0.1 * torch.randn(2, *params[n].shape, generator=g, dtype=torch.float64)
                                for n in names})
    mixed = fxstream.Mixed(fxstream.Diagonal({"2.weight": rand("2.weight")}), fxstream.Dense({("0.weight", "0.bias"): 0.01 * spd(30)}, params))
    return {"diagonal": diagonal, "kfac": kfac, "eigen": eigen, "dense": dense, "lowrank": lowrank, "mixed": mixed}


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "eigen", "dense", "lowrank", "mixed"])
def test_scaled_multiplies_marginals_and_the_linearised_predictive(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    posterior = _posteriors(model)[kind]
    scales = {"0": 0.3, "2": 2.5}
    layered = posterior.scaled(scales)
    assert _layout(layered) == _layout(posterior)
    base, marginals = posterior.to_diagonal().variances, layered.to_diagonal().variances
    for name in posterior.parameter_names():
        torch.testing.assert_close(marginals[name], scales[name.split(".")[0]] * base[name], rtol=1e-12, atol=0)
    x = torch.randn(5, 4, dtype=torch.float64)

    def cov(p):
        return fxstream.streamline(model, p, products="linearised", activation_cov="full", backend="eager")(x).cov

    torch.testing.assert_close(cov(posterior.scaled(0.4)), 0.4 * cov(posterior), rtol=1e-10, atol=1e-14)
    assert cov(posterior.scaled(0.0)).abs().max() == 0


def test_scale_zero_is_the_map_network_and_bad_values_are_named():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    posterior = _posteriors(model)["dense"]
    with pytest.raises(PosteriorMismatchError, match="scale of parameter '0.weight'"):
        posterior.scaled({"0": -1.0, "2": 1.0})
    with pytest.raises(PosteriorMismatchError, match="names \\['3'\\]"):
        posterior.scaled({"0": 1.0, "2": 1.0, "3": 1.0})
    with pytest.raises(PosteriorMismatchError, match="no key for parameter '2.weight'"):
        posterior.scaled({"0": 1.0})
    with pytest.raises(PosteriorMismatchError, match="shares its covariance block"):
        posterior.scaled({"0.weight": 1.0, "0.bias": 2.0, "2": 1.0})
    with pytest.raises(FxstreamError, match="no precision form"):
        posterior.with_prior_precision(1.0)
