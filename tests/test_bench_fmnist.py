"""benchmarks/bench_fmnist.py's hand-over of fxstream.tune's choice to laplace-torch, checked by laplace-torch.

GLM and MC-100 must predict from the posterior fxstream tuned: a per-layer prior precision keyed by module path
becomes laplace-torch's per-parameter-tensor prior, whose posterior precision is then the GGN diagonal plus
each layer's prior, the same as fxstream's own tuned posterior.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fxstream

pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "bench_fmnist", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fmnist.py")
bench = sys.modules["bench_fmnist"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_a_per_layer_choice_gives_laplace_torch_the_posterior_fxstream_tuned() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).eval()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    chosen = {"0": 3.0, "2": 250.0}
    la.prior_precision = bench.laplace_prior(model, chosen)
    uniform = fxstream.from_laplace(la).with_prior_precision(1.0)
    per_layer = fxstream.from_laplace(la).with_prior_precision(chosen)
    expected = torch.cat([per_layer.variances[name].reshape(-1) for name, _ in model.named_parameters()])
    torch.testing.assert_close(1 / la.posterior_precision, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(torch.cat([v.reshape(-1) for v in uniform.variances.values()]), expected)
    assert bench.laplace_prior(model, 7.0) == 7.0
