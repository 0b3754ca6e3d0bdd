"""The public API around the pass, each against an independent oracle.

- ``Predictive.probs("mc")``, ``sample_outputs``, ``predictive_var`` and ``nlpd``:
  Gauss-Hermite quadrature of the binary softmax (exact for a Gaussian logit
  difference), sample moments within five standard errors, and the closed
  forms of the Gaussian and categorical likelihoods;
- ``streamline(output=...)`` on tuple and dict outputs, per-sample ``input_cov``
  and ``variance_matmul="bfloat16"`` end to end: exact moments of a linear
  layer, or J_x S_b J_x^T (torch.func.jacrev) per sample;
- every validation error of backend.py, ``NoPredictiveError`` and ``CaptureError``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev

import fxstream
from fxstream.backend import StreamlineOptions
from fxstream.passes import capture

DTYPE = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Predictive on its own: quadrature and sample-moment oracles --------------------------------------------

NODES, WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(80))


def gaussian_expectation(fn, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[fn(z)] for z ~ N(mean, var), elementwise, by 80-point Gauss-Hermite quadrature."""
    z = mean[..., None] + (2 * var[..., None]).sqrt() * NODES
    return (WEIGHTS * fn(z)).sum(-1) / math.sqrt(math.pi)


def binary_predictive(correlation: float) -> fxstream.Predictive:
    """Two-class logits for three samples with variances 4 and 3 and the given logit correlation."""
    mean = torch.tensor([[0.0, 1.5], [1.0, -0.5], [0.3, 1.4]], dtype=DTYPE)
    var = torch.tensor([[4.0, 3.0], [2.0, 5.0], [1.0, 1.0]], dtype=DTYPE)
    c = correlation * (var[:, 0] * var[:, 1]).sqrt()
    cov = torch.stack([torch.stack([var[:, 0], c], -1), torch.stack([c, var[:, 1]], -1)], -2)
    return fxstream.Predictive(mean, var, cov, likelihood="classification")


def binary_oracle(pred: fxstream.Predictive) -> tuple[torch.Tensor, torch.Tensor]:
    """P(class 1) = E[sigmoid(f1 - f0)] and the variance of sigmoid(f1 - f0), by quadrature."""
    cov = pred.cov if pred.cov is not None else torch.diag_embed(pred.var)
    mean = pred.mean[:, 1] - pred.mean[:, 0]
    var = cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]
    p1 = gaussian_expectation(torch.sigmoid, mean, var)
    second = gaussian_expectation(lambda z: torch.sigmoid(z).square(), mean, var)
    return p1, second - p1.square()


@pytest.mark.parametrize("full", [True, False], ids=["full-cov", "diag"])
def test_mc_link_matches_quadrature(full: bool) -> None:
    """probs("mc") averages the softmax of logits drawn from N(mean, cov): for two classes that is
    E[sigmoid(f1 - f0)], one-dimensional quadrature. Bound: five Monte Carlo standard errors. The
    correlation of 0.9 moves the answer by far more than that, so dropping the covariance would fail."""
    pred = binary_predictive(0.9)
    if not full:
        pred = fxstream.Predictive(pred.mean, pred.var, None, likelihood="classification")
    samples = 40_000
    probs = pred.probs("mc", samples=samples, generator=seeded(0))
    p1, var = binary_oracle(pred)
    bound = 5 * (var / samples).sqrt()
    assert ((probs[:, 1] - p1).abs() <= bound).all(), f"{probs[:, 1]} vs quadrature {p1} (bound {bound})"
    torch.testing.assert_close(probs[:, 0], 1 - probs[:, 1], rtol=0, atol=1e-12)
    if full:  # the covariance matters: the diagonal-only answer lies well outside the bound
        diag_p1, _ = binary_oracle(fxstream.Predictive(pred.mean, pred.var, None))
        assert ((diag_p1 - p1).abs() > 4 * bound).all()


def test_probit_link_is_the_closed_form() -> None:
    pred = binary_predictive(0.0)
    kappa = 1 / (1 + math.pi / 8 * pred.var).sqrt()
    expected = torch.exp(pred.mean * kappa) / torch.exp(pred.mean * kappa).sum(-1, keepdim=True)
    torch.testing.assert_close(pred.probs("probit"), expected, rtol=1e-12, atol=0)
    with pytest.raises(fxstream.FxstreamError, match="unknown link 'laplace'"):
        pred.probs("laplace")


def spd_blocks(batch: int, n: int, seed: int) -> torch.Tensor:
    a = torch.randn(batch, n, n, generator=seeded(seed), dtype=DTYPE)
    return a @ a.transpose(1, 2) / n + 0.2 * torch.eye(n, dtype=DTYPE)


@pytest.mark.parametrize("full", [True, False], ids=["full-cov", "diag"])
def test_sample_outputs_have_the_predictive_moments(full: bool) -> None:
    """Draws from sample_outputs: sample mean and covariance within five standard errors of the
    predictive's (SE of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)). The output is (B, 2, 3), so the
    full covariance is (B, 2, 3, 2, 3) and the draws must undo its reshape."""
    batch, shape, n = 2, (2, 3), 6
    mean = torch.randn(batch, *shape, generator=seeded(1), dtype=DTYPE)
    cov = spd_blocks(batch, n, seed=2)
    if not full:
        cov = torch.diag_embed(cov.diagonal(dim1=1, dim2=2))
    var = cov.diagonal(dim1=1, dim2=2).reshape(batch, *shape)
    pred = fxstream.Predictive(mean, var, cov.reshape(batch, *shape, *shape) if full else None)
    samples = 50_000
    draws = pred.sample_outputs(samples, generator=seeded(3))
    assert draws.shape == (samples, batch, *shape)
    flat = draws.reshape(samples, batch, n)
    centred = flat - flat.mean(0)
    empirical = torch.einsum("sbi,sbj->bij", centred, centred) / (samples - 1)
    diag = cov.diagonal(dim1=1, dim2=2)
    se_mean = (diag / samples).sqrt()
    se_cov = ((diag[:, :, None] * diag[:, None, :] + cov.square()) / samples).sqrt()
    assert ((flat.mean(0) - mean.reshape(batch, n)).abs() <= 5 * se_mean).all()
    assert ((empirical - cov).abs() <= 5 * se_cov).all()


def test_predictive_var_adds_the_observation_noise() -> None:
    var = torch.rand(4, 2, generator=seeded(4), dtype=DTYPE)
    mean = torch.zeros_like(var)
    assert torch.equal(fxstream.Predictive(mean, var).predictive_var(), var)
    noisy = fxstream.Predictive(mean, var, likelihood="regression", sigma_noise=0.3).predictive_var()
    torch.testing.assert_close(noisy, var + 0.09, rtol=1e-15, atol=0)


def test_nlpd_closed_forms() -> None:
    """Regression: the Gaussian log density; classification: cross-entropy of the probit (or MC) probabilities."""
    g = seeded(5)
    mean, var = torch.randn(6, 3, generator=g, dtype=DTYPE), torch.rand(6, 3, generator=g, dtype=DTYPE) + 0.1
    y = torch.randn(6, 3, generator=g, dtype=DTYPE)
    regression = fxstream.Predictive(mean, var, likelihood="regression", sigma_noise=0.5)
    expected = -torch.distributions.Normal(mean, (var + 0.25).sqrt()).log_prob(y).mean()
    torch.testing.assert_close(regression.nlpd(y), expected, rtol=1e-12, atol=0)

    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    classification = fxstream.Predictive(mean, var, likelihood="classification")
    scaled = mean / (1 + math.pi / 8 * var).sqrt()
    torch.testing.assert_close(classification.nlpd(labels), nn.functional.cross_entropy(scaled, labels),
                               rtol=1e-12, atol=0)

    binary = binary_predictive(0.9)
    labels = torch.tensor([1, 0, 1])
    p1, p1_var = binary_oracle(binary)
    picked = torch.where(labels == 1, p1, 1 - p1)
    torch.manual_seed(6)  # nlpd(link="mc") draws with the global generator and the default 1000 samples
    got = binary.nlpd(labels, link="mc")
    bound = (5 * (p1_var / 1000).sqrt() / picked).mean()  # d(-log p) = dp / p, summed over the mean
    assert abs(got - (-picked.log().mean())) <= bound

    with pytest.raises(fxstream.FxstreamError, match="nlpd needs a likelihood"):
        fxstream.Predictive(mean, var).nlpd(y)


# --- streamline end to end: outputs, likelihoods, input covariance, bfloat16 variance GEMMs -----------------

def linear_moments(layer: nn.Linear, v_w: torch.Tensor, v_b: torch.Tensor, x: torch.Tensor,
                   s: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Exact output variance of W x + b with diagonal weight, bias and input variances (method.md)."""
    w = layer.weight.detach().to(DTYPE)
    s = torch.as_tensor(s, dtype=DTYPE).expand(x.shape)
    return s @ (w.square() + v_w).T + x.to(DTYPE).square() @ v_w.T + v_b


class TwoHeads(nn.Module):
    """Returns two heads as a tuple, or as a dict without a "logits" key."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.as_dict = as_dict
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        if self.as_dict:
            return {"aux": self.b(x), "main": self.a(x)}
        return self.a(x), self.b(x)


def head_variances(model: TwoHeads) -> dict[str, torch.Tensor]:
    g = seeded(7)
    return {n: 0.01 + 0.1 * torch.rand(p.shape, generator=g, dtype=DTYPE) for n, p in model.named_parameters()}


@pytest.mark.parametrize("as_dict, output, head", [(False, None, "a"), (False, 1, "b"), (False, 0, "a"),
                                                   (True, None, "b"), (True, "main", "a")])
def test_output_selects_the_predicted_output(as_dict, output, head) -> None:
    """Default: the first tensor (or "logits"); output= picks by index or key. Oracle: the head's exact moments."""
    model = TwoHeads(as_dict).to(DTYPE).eval()
    var = head_variances(model)
    x = torch.randn(5, 4, generator=seeded(8), dtype=DTYPE)
    pred = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", output=output)(x)
    layer = getattr(model, head)
    torch.testing.assert_close(pred.mean, layer(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.var, linear_moments(layer, var[f"{head}.weight"], var[f"{head}.bias"], x),
                               rtol=1e-10, atol=0)


def test_regression_likelihood_reaches_the_predictive() -> None:
    """likelihood="regression", sigma_noise=0.3 through streamline: predictive_var and nlpd of the exact moments."""
    model = TwoHeads().a.to(DTYPE).eval()
    var = {n: 0.05 * torch.ones_like(p) for n, p in model.named_parameters()}
    x = torch.randn(5, 4, generator=seeded(9), dtype=DTYPE)
    y = torch.randn(5, 3, generator=seeded(10), dtype=DTYPE)
    pred = fxstream.streamline(model, fxstream.Diagonal(var), likelihood="regression", sigma_noise=0.3,
                               backend="eager")(x)
    total = linear_moments(model, var["weight"], var["bias"], x) + 0.09
    torch.testing.assert_close(pred.predictive_var(), total, rtol=1e-10, atol=0)
    expected = -torch.distributions.Normal(model(x).detach(), total.sqrt()).log_prob(y).mean()
    torch.testing.assert_close(pred.nlpd(y), expected, rtol=1e-10, atol=0)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).to(DTYPE).eval()


def test_per_sample_input_cov_equals_each_samples_input_jacobian() -> None:
    """input_cov of shape (B, N, N): sample b's output covariance is J_x(b) S_b J_x(b)^T (no branches, exact)."""
    model = small_mlp()
    x = torch.randn(3, 4, generator=seeded(11), dtype=DTYPE)
    cov = 0.05 * spd_blocks(3, 4, seed=12)
    pred = fxstream.streamline(model, input_cov=cov, activation_cov="full", backend="eager")(x)
    jac = torch.stack([jacrev(lambda v: model(v[None])[0])(x[b]) for b in range(3)])
    expected = jac @ cov @ jac.transpose(1, 2)
    torch.testing.assert_close(pred.cov, expected, rtol=1e-9, atol=0)
    shared = fxstream.streamline(model, input_cov=cov[0], activation_cov="full", backend="eager")(x)
    assert not torch.allclose(shared.cov[1:], expected[1:])  # the per-sample covariances are really used


def test_bfloat16_variance_matmul_end_to_end() -> None:
    """variance_matmul="bfloat16" on a float32 layer with uncertain weights, bias and input. Every term of the
    variance GEMMs is a product of two non-negative operands, each rounded to bfloat16 (relative error <= 2^-8),
    and the product is returned in bfloat16 (another 2^-8): each output is within (1 + 2^-8)^3 - 1 of the exact
    moments (float64, closed form), plus float32 accumulation. The exact option is within float32 rounding."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).eval()
    g = seeded(13)
    var = {n: 1e-3 * torch.rand(p.shape, generator=g) for n, p in layer.named_parameters()}
    s = 0.1 * torch.rand(64, generator=g)
    x = torch.randn(16, 64, generator=g)
    exact = linear_moments(layer, var["weight"].double(), var["bias"].double(), x.double(), s.double())
    errors = {}
    for choice in ("exact", "bfloat16"):
        pred = fxstream.streamline(layer, fxstream.Diagonal(var), input_var=s, variance_matmul=choice,
                                   backend="eager")(x)
        errors[choice] = ((pred.var.double() - exact).abs() / exact).max().item()
    assert errors["exact"] < 1e-5
    assert 1e-5 < errors["bfloat16"] <= (1 + 2**-8) ** 3 - 1 + 1e-5, errors


# --- validation errors ---------------------------------------------------------------------------------------

def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3).eval()


def some_posterior() -> fxstream.Diagonal:
    return fxstream.Diagonal({"weight": torch.full((3, 4), 1e-2)})


@pytest.mark.parametrize("kwargs, message", [
    ({"attention": "exact"}, r"unknown rule option attention='exact'"),
    ({"variance_matmul": "float8"}, r"unknown rule option variance_matmul='float8'"),
    ({"likelihood": "poisson"}, r"likelihood must be 'classification', 'regression' or None, got 'poisson'"),
    ({"input_var": 0.1, "input_cov": torch.eye(4)}, "give input_var or input_cov, not both"),
])
def test_invalid_streamline_options_are_rejected(kwargs, message) -> None:
    with pytest.raises(fxstream.FxstreamError, match=message):
        fxstream.streamline(linear(), some_posterior(), backend="eager", **kwargs)


def test_posterior_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(fxstream.FxstreamError, match="posterior must be an fxstream posterior.*got dict"):
        fxstream.streamline(linear(), {"weight": torch.ones(3, 4)}, backend="eager")


def test_unknown_torch_compile_option_is_rejected() -> None:
    with pytest.raises(fxstream.FxstreamError, match=r"unknown streamline option\(s\) \['input_variance'\]"):
        StreamlineOptions.from_mapping({"input_variance": 0.1})
    with pytest.raises(fxstream.FxstreamError, match="nothing is uncertain"):
        StreamlineOptions.from_mapping({})


@pytest.mark.parametrize("kwargs, message", [
    ({"input_var": torch.full((5,), 0.1)}, r"input_var of shape \(5,\) does not broadcast to the input's shape "
                                           r"\(2, 4\)"),
    ({"input_cov": torch.eye(5)}, r"input_cov must have shape \(4, 4\) or \(2, 4, 4\).*got \(5, 5\)"),
    ({"input_cov": torch.eye(4).expand(3, 4, 4)}, r"got \(3, 4, 4\)"),
])
def test_input_uncertainty_of_the_wrong_shape_is_rejected(kwargs, message) -> None:
    streamlined = fxstream.streamline(linear(), backend="eager", **kwargs)
    with pytest.raises(fxstream.FxstreamError, match=message):
        streamlined(torch.randn(2, 4))


def test_input_variance_without_a_floating_input_is_rejected() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 2)).eval()
    streamlined = fxstream.streamline(model, input_var=0.1, backend="eager")
    with pytest.raises(fxstream.FxstreamError, match="the model has no floating-point input"):
        streamlined(torch.tensor([[1, 2, 3]]))


def root_cause(error: BaseException) -> BaseException:
    """The innermost error Dynamo wrapped (BackendCompilerFailed keeps it as inner_exception)."""
    while True:
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            return error
        error = inner


@pytest.mark.parametrize("variances, message", [
    ({"fc.weight": torch.ones(3, 4)}, r"names parameter 'fc\.weight', which this captured graph does not use"),
    ({"weight": torch.ones(4, 3)}, r"'weight' has shape \(4, 3\)"),
])
def test_torch_compile_path_checks_the_posterior_against_the_graph(variances, message) -> None:
    """Without the model (torch.compile path) the backend matches the posterior against the graph's parameters."""
    compiled = torch.compile(linear(), backend="streamline", fullgraph=True,
                             options={"posterior": fxstream.Diagonal(variances), "backend": "eager"})
    with pytest.raises(Exception) as caught, torch.no_grad():
        compiled(torch.randn(2, 4))
    cause = root_cause(caught.value)
    assert isinstance(cause, fxstream.PosteriorMismatchError), repr(cause)
    assert re.search(message, str(cause)), str(cause)


def test_a_tensor_no_streamlined_call_returned_has_no_predictive() -> None:
    with pytest.raises(fxstream.NoPredictiveError, match="not returned by a streamlined model"):
        fxstream.predictive(torch.zeros(3))
    with pytest.raises(fxstream.NoPredictiveError):
        fxstream.predictive([torch.zeros(3)])


def test_capture_needs_dynamos_graph_and_matching_inputs() -> None:
    traced = torch.fx.symbolic_trace(linear())
    with pytest.raises(fxstream.CaptureError, match="graph has 1 inputs but 2 example inputs were given"):
        capture(traced, [torch.randn(2, 4), torch.randn(2, 4)])
    with pytest.raises(fxstream.CaptureError, match="carries no fake tensors"):
        capture(traced, [torch.randn(2, 4)])


def test_planning_takes_a_batch_of_one_and_rejects_an_empty_one() -> None:
    """Dynamo cannot make a size-1 dimension symbolic: capture widens it to two copies; the plan is for batch 1."""
    streamlined = fxstream.streamline(linear(), some_posterior(), budget="1MiB", example_inputs=torch.randn(1, 4))
    assert streamlined.plan.sizes == {"batch": 1}
    with pytest.raises(fxstream.CaptureError, match="empty in dim 0"):
        fxstream.streamline(linear(), some_posterior(), budget="1MiB", example_inputs=torch.randn(0, 4))


def test_more_streamlined_models_than_one_models_graph_limit_each_compile_their_own() -> None:
    """Dynamo keeps its recompile limit per code object: each StreamlinedModel has its own, so a process can
    make many (a tuning loop, a test suite) without the 65th failing."""
    for _ in range(fxstream.StreamlinedModel.MAX_GRAPHS + 2):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
        posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
        streamlined = fxstream.streamline(model, posterior, backend="eager")
        x = torch.randn(5, 3)
        torch.testing.assert_close(streamlined(x).mean, model(x))
        assert len(streamlined.graphs) == 1
