"""The core of benchmarks/bench_uci.py on a tiny split written in the UCI layout, checked against oracles.

For a one-hidden-layer network laplace-torch's GLM predictive and fxstream's
first-order predictive are the same quantity, J Sigma J^T: with a diagonal
posterior even under diagonal activations (the hidden units' pre-activations
are independent, each row of W1 having its own weights), with a Kronecker
posterior once the activations carry their full covariance. The Monte Carlo
mixture density is checked against its direct sum, and tuning against a split
whose test targets are unusable.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxstream

pytest.importorskip("laplace")
spec = importlib.util.spec_from_file_location(
    "bench_uci", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_uci.py")
bench = sys.modules["bench_uci"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """120 rows of y = sin(2 x0) + x1 x2 + noise, 4 inputs (one constant), one split, as the UCI files are laid out."""
    root = tmp_path_factory.mktemp("uci")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    x[:, 3] = 2.0
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * rng.normal(size=120)
    np.savetxt(root / "data.txt", np.column_stack([x, y]))
    np.savetxt(root / "index_features.txt", np.arange(4), fmt="%d")
    np.savetxt(root / "index_target.txt", [4], fmt="%d")
    order = rng.permutation(120)
    np.savetxt(root / "index_train_0.txt", order[:100], fmt="%d")
    np.savetxt(root / "index_test_0.txt", order[100:], fmt="%d")
    np.savetxt(root / "n_splits.txt", [1], fmt="%d")
    return root


@pytest.fixture(scope="module")
def fitted(folder):
    split = bench.load_split(folder, 0, dtype=torch.float64)
    model = bench.train_map(split, hidden=16, steps=300, seed=0)
    return split, model


def test_split_is_standardised_on_training_statistics(folder):
    split = bench.load_split(folder, 0, dtype=torch.float64)
    train = torch.cat([split.x_train, split.x_val])
    assert (len(split.x_train), len(split.x_val), len(split.x_test)) == (80, 20, 20)
    assert torch.allclose(train[:, :3].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(train[:, :3].std(0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(train[:, 3], torch.zeros(100, dtype=torch.float64))  # the constant column is centred, not divided by 0
    assert torch.allclose(torch.cat([split.y_train, split.y_val]).std(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("structure, options", [("diag", {"products": "linearised"}),
                                                ("kron", {"products": "linearised", "activation_cov": "full"})])
def test_first_order_fxstream_equals_laplace_glm(fitted, structure, options):
    split, model = fitted
    la = bench.fit_laplace(model, split, structure, sigma_noise=0.3)
    la.prior_precision = 2.0
    predictor = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="regression", backend="eager",
                                    **options)
    pred = predictor(split.x_test)
    glm_mean, glm_var = la(split.x_test, pred_type="glm")
    torch.testing.assert_close(pred.mean, glm_mean.reshape(pred.mean.shape), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.var, glm_var.reshape(pred.var.shape), rtol=1e-8, atol=1e-14)
    assert float(pred.var.min()) > 1e-4 * float(pred.var.max()) > 0  # a posterior that matters


def test_mixture_nlpd_is_the_mixture_density():
    samples = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.0]], dtype=torch.float64).unsqueeze(-1)
    y = torch.tensor([[0.3], [0.2]], dtype=torch.float64)
    noise = 0.7
    density = torch.exp(-(y.unsqueeze(0) - samples) ** 2 / (2 * noise ** 2)) / math.sqrt(2 * math.pi * noise ** 2)
    torch.testing.assert_close(bench.mixture_nlpd(samples, noise, y), -torch.log(density.mean(0)))
    one = samples[:1].expand(5, -1, -1)  # identical draws: the Gaussian itself
    torch.testing.assert_close(bench.mixture_nlpd(one, noise, y),
                               bench.gaussian_nlpd(samples[0], torch.full_like(y, noise ** 2), y))


def test_best_noise_is_the_maximum_likelihood_noise_on_the_grid():
    residual = torch.tensor([[0.3], [-0.1], [0.25], [-0.4]], dtype=torch.float64)
    noise, score = bench.best_noise(residual, torch.zeros_like(residual), torch.zeros_like(residual))
    mle = float(residual.pow(2).mean().sqrt())
    grid = np.array(bench.NOISE_GRID)
    neighbours = grid[np.argsort(np.abs(np.log(grid / mle)))[:2]]
    assert noise in neighbours
    assert score == pytest.approx(float(bench.gaussian_nlpd(residual, torch.full_like(residual, noise ** 2),
                                                            torch.zeros_like(residual)).mean()))


def test_tuning_reads_no_test_data_and_every_method_runs(fitted):
    split, model = fitted
    la = bench.fit_laplace(model, split, "diag", sigma_noise=0.3)
    poisoned = bench.Split(split.x_train, split.y_train, split.x_val, split.y_val, split.x_test,
                           torch.full_like(split.y_test, float("nan")), split.y_scale)
    grid = (0.1, 1.0, 10.0)
    assert bench.tune_split(la, model, poisoned, {}, grid) == bench.tune_split(la, model, split, {}, grid)
    result = bench.evaluate_split(split, hidden=16, steps=300, seed=0, repeats=1, mc_samples=(20, 40),
                                  structures=("diag",), tune=functools.partial(bench.tune_split, grid=grid))
    methods = result["diag"]
    assert set(methods) == {"tuned", "MAP", "MC-20", "MC-40", bench.MC_OWN, "GLM", *bench.FX_VARIANTS}
    # the same predictive (J Sigma J^T) reaches the same tuned noise and score
    assert methods["GLM"]["nlpd"] == pytest.approx(methods["fxstream linearised/diag"]["nlpd"], rel=1e-6)
    # every method predicts with the MAP network's output except Monte Carlo
    assert methods["GLM"]["rmse"] == pytest.approx(methods["MAP"]["rmse"], rel=1e-9)
