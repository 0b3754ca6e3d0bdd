"""benchmarks/bench_vit.py's posterior and Monte Carlo on a tiny ViT, against a dense GGN and the MAP network."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fxstream

spec = importlib.util.spec_from_file_location(
    "bench_vit", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vit.py")
bench = sys.modules["bench_vit"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    model = bench.ViT(dim=8, depth=3, heads=2, hidden=16).double().eval()
    return model, torch.randn(3, 1, 28, 28, dtype=torch.float64)


def test_ggn_diagonal_is_the_diagonal_of_the_dense_ggn(tiny):
    model, images = tiny
    params = bench.bayesian_parameters(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def logits(vector: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, [s.numel() for s in shapes])
        values = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return torch.func.functional_call(model, values, (image.unsqueeze(0),)).squeeze(0)

    dense = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for image in images:
        jac = torch.func.jacrev(logits)(flat, image)  # (classes, P)
        p = torch.softmax(logits(flat, image), -1)
        dense += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    diagonal = bench.ggn_diagonal(model, images, chunk=2)
    assert list(diagonal) == names
    torch.testing.assert_close(torch.cat([diagonal[n].reshape(-1) for n in names]), dense.diagonal())


def test_monte_carlo_restores_the_weights_and_a_zero_posterior_is_the_map(tiny):
    model, images = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    variances = {n: torch.zeros_like(p) for n, p in bench.bayesian_parameters(model).items()}
    probs = bench.mc_probs(model, fxstream.Diagonal(variances), images, samples=3)
    torch.testing.assert_close(probs, torch.softmax(model(images), -1))
    moments = bench.mc_moments(model, fxstream.Diagonal(variances), images, samples=3)
    torch.testing.assert_close(moments.mean, model(images))
    assert torch.equal(moments.var, torch.zeros_like(moments.var))
    broad = fxstream.Diagonal({n: torch.full_like(v, 0.1) for n, v in variances.items()})
    assert not torch.allclose(bench.mc_probs(model, broad, images, samples=3), probs)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_the_vit_runs_lowered_at_every_batch_size_from_one_graph(tiny):
    """Its lowered graph records torch.sym_sum (a sum of symbolic sizes), which must count as plain ATen."""
    model, images = tiny
    variances = {n: torch.full_like(p, 1e-3) for n, p in bench.bayesian_parameters(model).items()}
    streamlined = fxstream.streamline(model, fxstream.Diagonal(variances), backend="eager")
    both = streamlined(torch.cat([images, images.flip(-1)]))
    first = streamlined(images)
    assert len(streamlined.graphs) == 1
    torch.testing.assert_close(first.var, both.var[:3], rtol=1e-12, atol=0)  # samples are independent
    assert not torch.allclose(both.var[3:], first.var)
