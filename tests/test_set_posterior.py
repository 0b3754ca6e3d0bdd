"""``StreamlinedModel.set_posterior``: a new prior or scale without a new capture or compile.

The oracle for every update is a model streamlined afresh with the new posterior.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream
from fxstream.errors import FxstreamError, PosteriorMismatchError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _posteriors(model: nn.Module) -> tuple[fxstream.Posterior, fxstream.Posterior]:
    """A Dense (joint weight-bias block) + Diagonal posterior and one of the same structure, new values."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)

    def make(level):
        a = torch.randn(27, 27, generator=g)
        dense = fxstream.Dense({("2.weight", "2.bias"): level * (a @ a.t() / 27 + 0.1 * torch.eye(27))}, params)
        diagonal = fxstream.Diagonal({"0.weight": level * torch.rand(8, 4, generator=g)})
        return fxstream.Mixed(dense, diagonal)

    return make(1e-2), make(3e-2)


def _check(backend: str) -> fxstream.StreamlinedModel:
    model = _model()
    first, second = _posteriors(model)
    x = torch.randn(6, 4)
    sm = fxstream.streamline(model, first, likelihood="classification", backend=backend)
    before = sm(x)
    sm.set_posterior(second)
    after = sm(x)
    fresh = fxstream.streamline(model, second, likelihood="classification", backend="eager")(x)
    torch.testing.assert_close(after.var, fresh.var, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(after.var, before.var)
    sm.set_posterior(first.scaled(0.0))
    torch.testing.assert_close(sm(x).var, torch.zeros_like(before.var))
    assert len(sm.graphs) == 1
    assert sm.posterior.parameter_names() == first.parameter_names()
    return sm


def test_set_posterior_eager_matches_a_fresh_streamline_and_leaves_the_callers_posterior():
    model = _model()
    first, second = _posteriors(model)
    kept = first.covariance("0.weight").tensors[0].clone()
    _check("eager")
    sm = fxstream.streamline(model, first, backend="eager")
    sm(torch.randn(2, 4))
    sm.set_posterior(second)
    assert torch.equal(first.covariance("0.weight").tensors[0], kept)


@pytest.mark.inductor
def test_set_posterior_under_inductor_compiles_once():
    _check("inductor")


def test_set_posterior_rejects_another_structure_naming_the_parameter():
    model = _model()
    first, _ = _posteriors(model)
    sm = fxstream.streamline(model, first, backend="eager")
    params = dict(model.named_parameters())
    other = fxstream.Mixed(fxstream.Diagonal({"2.weight": torch.ones(3, 8), "2.bias": torch.ones(3)}),
                           fxstream.Diagonal({"0.weight": torch.ones(8, 4)}))
    with pytest.raises(PosteriorMismatchError, match="parameter '2.weight' has covariance 'param_diag'"):
        sm.set_posterior(other)
    with pytest.raises(PosteriorMismatchError, match="leaves parameter '0.weight' out"):
        sm.set_posterior(fxstream.Dense({("2.weight", "2.bias"): torch.eye(27)}, params))
    with pytest.raises(PosteriorMismatchError, match="covers parameter '0.bias'"):
        sm.set_posterior(fxstream.Mixed(first, fxstream.Diagonal({"0.bias": torch.ones(8)})))
    with pytest.raises(FxstreamError, match="without a weight posterior"):
        fxstream.streamline(model, input_var=0.1, backend="eager").set_posterior(first)
