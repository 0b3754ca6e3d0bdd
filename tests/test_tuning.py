"""fxstream.tune: every candidate one streamlined pass, scores equal to a freshly streamlined model's."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxstream
from fxstream.errors import FxstreamError, FxstreamWarning

laplace = pytest.importorskip("laplace", reason="laplace-torch is an optional extra (requirements/laplace.txt)")
from test_posteriors_laplace import data, fitted  # noqa: E402


class Counted:
    """A loader that counts the passes made over it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> None:
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _validation(likelihood: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data("mlp", likelihood, n=80)
    return x[48:], y[48:]  # the fits use the first 48


def _fresh_nlpd(model, posterior, x, y, likelihood, sigma=None) -> float:
    pred = fxstream.streamline(model, posterior, likelihood=likelihood, sigma_noise=sigma, backend="eager")(x)
    return float(pred.nlpd(y))


def test_prior_grid_classification_passes_scores_and_choice():
    model, la, _ = fitted("mlp", "classification", "kron", subset="all", prior_precision=1.0)
    posterior = fxstream.from_laplace(la)
    x, y = _validation("classification")
    sm = fxstream.streamline(model, posterior, likelihood="classification", backend="eager")
    loader = Counted(x, y)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    result = fxstream.tune(sm, loader, prior_precision=grid, progress=False)
    assert loader.passes == result.passes == len(grid)
    for settings, score in result.candidates:
        expected = _fresh_nlpd(model, posterior.with_prior_precision(settings["prior_precision"]), x, y,
                               "classification")
        assert score == pytest.approx(expected, rel=1e-10)
    best = min(result.candidates, key=lambda c: c[1])
    assert result.prior_precision == best[0]["prior_precision"] and result.score == best[1]
    assert float(sm(x).nlpd(y)) == pytest.approx(result.score, rel=1e-10)  # applied
    assert f"{result.prior_precision:.4g}" in str(result) and "<-" in result.table


def test_noise_grid_is_scored_without_passes_and_edges_warn():
    model, la, _ = fitted("mlp", "regression", "diag", subset="all", prior_precision=1.0, sigma_noise=0.5)
    posterior = fxstream.from_laplace(la)
    x, y = _validation("regression")
    sm = fxstream.streamline(model, posterior, likelihood="regression", sigma_noise=0.5, backend="eager")
    loader = Counted(x, y)
    noise = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    with pytest.warns(FxstreamWarning, match="an end of its grid") as caught:
        result = fxstream.tune(sm, loader, prior_precision=[1e3, 1e4], sigma_noise=noise, progress=False)
    assert loader.passes == 2 and len(result.candidates) == 2 * len(noise)
    brute = {(p, s): _fresh_nlpd(model, posterior.with_prior_precision(p), x, y, "regression", s)
             for p in (1e3, 1e4) for s in noise}
    (p, s), best = min(brute.items(), key=lambda item: item[1])
    assert (result.prior_precision, result.sigma_noise) == (p, s) and result.score == pytest.approx(best, rel=1e-10)
    assert sm.options.sigma_noise == s
    assert any("prior_precision" in edge for edge in result.at_edge) and len(caught) == len(result.at_edge)


def test_per_layer_coordinate_search_costs_one_pass_per_candidate():
    model, la, _ = fitted("mlp", "classification", "diag", subset="all", prior_precision=1.0)
    x, y = _validation("classification")
    sm = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="classification", backend="eager")
    loader = Counted(x, y)
    grid = [0.1, 1.0, 10.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxstreamWarning)
        result = fxstream.tune(sm, loader, prior_precision=grid, scale=[0.5, 1.0], per_layer=True, progress=False)
    layers = 3  # "0", "2", "4"
    assert loader.passes == 3 * 2 + layers * (3 + 2)
    assert set(result.prior_precision) == {"0", "2", "4"} and set(result.scale) == {"0", "2", "4"}
    expected = _fresh_nlpd(model, sm.posterior, x, y, "classification")
    assert result.score == pytest.approx(expected, rel=1e-10)
    assert result.score <= min(score for settings, score in result.candidates[:6])


def test_marglik_delegates_to_laplace_without_passes():
    model, la, _ = fitted("mlp", "regression", "kron", subset="all", prior_precision=1.0, sigma_noise=0.5)
    sm = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="regression", sigma_noise=0.5,
                             backend="eager")
    loader = Counted(*_validation("regression"))
    grid, noise = [0.1, 0.3, 1.0, 3.0, 10.0], [0.2, 0.3, 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxstreamWarning)
        result = fxstream.tune(sm, loader, prior_precision=grid, sigma_noise=noise, objective="marglik",
                               progress=False)
    assert loader.passes == 0
    scores = {(p, s): la.log_marginal_likelihood(torch.tensor(p, dtype=torch.float64),
                                                 torch.tensor(s, dtype=torch.float64)).item()
              for p in grid for s in noise}
    p, s = max(scores, key=scores.get)
    assert (result.prior_precision, result.sigma_noise) == (p, s)
    assert result.score == pytest.approx(-scores[(p, s)], rel=1e-10)


def test_clear_errors():
    model, la, _ = fitted("mlp", "classification", "diag", subset="all")
    sm = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="classification", backend="eager")
    loader = Counted(*_validation("classification"))
    with pytest.raises(FxstreamError, match="not a variance scale"):
        fxstream.tune(sm, loader, scale=[0.0, 1.0], objective="marglik", progress=False)
    with pytest.raises(FxstreamError, match="observation noise of regression"):
        fxstream.tune(sm, loader, sigma_noise=[0.1], progress=False)
    plain = fxstream.streamline(model, fxstream.from_laplace(la).to_diagonal(), likelihood="classification",
                                backend="eager")
    with pytest.raises(FxstreamError, match="no precision form"):
        fxstream.tune(plain, loader, prior_precision=[1.0], progress=False)
    with pytest.raises(FxstreamError, match="grid must be"):
        fxstream.tune(sm, loader, prior_precision=[0.0, 1.0], progress=False)


@pytest.mark.inductor
def test_default_grid_of_twenty_makes_twenty_passes_and_one_compile():
    model, la, _ = fitted("mlp", "classification", "kron", subset="all", prior_precision=1.0)
    x, y = _validation("classification")
    sm = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="classification")
    loader = Counted(x, y)  # 32 samples, batches of 8: one input shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxstreamWarning)
        result = fxstream.tune(sm, loader, progress=False)
    assert loader.passes == 20 and len(result.candidates) == 20 and len(sm.graphs) == 1
    expected = _fresh_nlpd(model, fxstream.from_laplace(la).with_prior_precision(result.prior_precision), x, y,
                           "classification")
    assert result.score == pytest.approx(expected, rel=1e-6)
