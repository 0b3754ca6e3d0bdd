"""Predictive conveniences and fxstream.predict, on one process and sharded over 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxstream
from fxstream.errors import FxstreamError


def _streamlined() -> fxstream.StreamlinedModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    posterior = fxstream.Diagonal({n: torch.full_like(p, 0.05) for n, p in model.named_parameters()})
    return fxstream.streamline(model, posterior, likelihood="classification", backend="eager")


def _loader(n: int = 23, batch_size: int = 5) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def test_entropy_and_mutual_information_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g, dtype=torch.float64)
    pred = fxstream.Predictive(mean, var, likelihood="classification")
    p = pred.probs()
    torch.testing.assert_close(pred.entropy(), -(p * p.log()).sum(-1))
    torch.testing.assert_close(pred.std, var.sqrt())
    # MI from the same draws, by hand
    draws = torch.softmax(pred.sample_outputs(4000, generator=torch.Generator().manual_seed(5)), -1)
    expected = -(draws.mean(0) * draws.mean(0).log()).sum(-1) + (draws * draws.log()).sum(-1).mean(0)
    torch.testing.assert_close(pred.mutual_information(4000, generator=torch.Generator().manual_seed(5)), expected)
    # zero variance: no epistemic part; one-hot certainty: zero entropy
    assert fxstream.Predictive(mean, torch.zeros_like(var)).mutual_information(50).abs().max() < 1e-12
    certain = fxstream.Predictive(torch.tensor([[1e4, 0.0]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    assert certain.entropy().item() == 0.0


def test_mutual_information_of_two_classes_matches_a_large_monte_carlo():
    """Binary logits with one uncertain: MI by quadrature over the Gaussian, within MC error."""
    mean = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    var = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    nodes = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    weight = torch.exp(-0.5 * nodes ** 2) / math.sqrt(2 * math.pi) * (nodes[1] - nodes[0])
    q = torch.sigmoid(0.5 + 2.0 * nodes)
    h = -(q * q.log() + (1 - q) * (1 - q).log())
    q_bar = (weight * q).sum()
    exact = -(q_bar * q_bar.log() + (1 - q_bar) * (1 - q_bar).log()) - (weight * h).sum()
    got = fxstream.Predictive(mean, var).mutual_information(200_000, generator=torch.Generator().manual_seed(1))
    assert abs(got.item() - exact.item()) < 5e-3  # MC standard error here is about 1e-3


def test_indexing_cat_and_to_round_trip():
    sm = _streamlined()
    x = torch.randn(7, 4)
    pred = sm(x)
    parts = [pred[:3], pred[3:5], pred[5:]]
    joined = fxstream.Predictive.cat(parts)
    assert torch.equal(joined.mean, pred.mean) and torch.equal(joined.var, pred.var)
    assert torch.equal(pred[torch.tensor([6, 0])].var, pred.var[[6, 0]])
    moved = pred.to(torch.float64).cpu()
    assert moved.mean.dtype == torch.float64 and moved.likelihood == "classification"
    regression = fxstream.Predictive(pred.mean, pred.var, likelihood="regression")
    with pytest.raises(FxstreamError, match="differ in likelihood"):
        fxstream.Predictive.cat([pred, regression])


def test_predict_equals_one_call_on_the_whole_set_in_order():
    sm = _streamlined()
    loader = _loader()
    pred, targets = fxstream.predict(sm, loader, progress=False)
    x, y = loader.dataset.tensors
    whole = sm(x)
    torch.testing.assert_close(pred.mean, whole.mean)
    torch.testing.assert_close(pred.var, whole.var)
    assert torch.equal(targets, y)
    inputs_only = torch.utils.data.DataLoader(x, batch_size=4)
    pred_x, none = fxstream.predict(sm, inputs_only, progress=False)
    assert none is None and torch.allclose(pred_x.var, whole.var)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        pred, targets = fxstream.predict(_streamlined(), _loader(), progress=False)
        torch.save({"mean": pred.mean, "var": pred.var, "targets": targets}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_predict_sharded_over_two_gloo_processes_equals_one_process(tmp_path):
    """Every rank gets the whole set in dataset order (23 samples: shards of 11 and 12)."""
    out = str(tmp_path / "result")
    # fork, not spawn: the children inherit the imported torch and fxstream instead of importing them again
    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True,
                       start_method="fork")
    single, targets = fxstream.predict(_streamlined(), _loader(), progress=False)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(got["mean"], single.mean)
        torch.testing.assert_close(got["var"], single.var)
        assert torch.equal(got["targets"], targets)
    assert not os.path.exists(f"{out}.2")
