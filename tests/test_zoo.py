"""The zoo's CI subset: real architectures, unchanged, from torchvision, timm and transformers.

Each model (random weights, eval mode, the catalogue's small input; float64
for the transformers, float32 for the CNNs, whose float64 convolutions are
slow on a CPU, with rounding still far below sampling noise)
is checked under the zoo's two posteriors (2% relative standard deviation) by
``fxstream.zoo.check_many``, one Dynamo capture for both:

- ``last-2``: the last two parameters, the head. The output is linear in them
  (bilinear for Llama's norm weight times its untied head, whose variance the
  product rule gives exactly), so fxstream's variance is the exact one and
  the only gap to Monte Carlo is sampling's. With N Gaussian draws the
  relative error of each element's variance estimate is |z| sqrt(2/(N-1)),
  z ~ N(0, 1): its median is 0.67 rse for independent elements, its 90th
  percentile 1.64 rse; even if every element's error moved together, the
  median passes 3 rse and the p90 4 rse with probability 0.3% and 0.006%.
- ``all``: every parameter. Each op then carries covariance, and the method's
  own approximations (diagonal activations, residual branches added as
  independent, attention probabilities from the mean queries and keys) move
  fxstream's variance away from the true one by more than sampling does. The
  bound is that approximation's allowance (a median relative error of 0.15,
  and 90% of the outputs within a factor of two) plus 3 rse of sampling.
  With 1000 draws (rse 0.045) that is a median below 0.28 and a p90 below
  1.18: it catches a rule that is off by a factor, not by a few percent.
  Only the transformers get Monte Carlo under ``all`` here (a CNN draw
  samples millions of weights); on the CNNs docs/zoo.md measures larger
  gaps (median errors of 0.2 to 0.7 on MnasNet, MobileNetV2, RegNet), which
  this allowance would not cover.

The whole zoo, with the same check, is ``python benchmarks/bench_zoo.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fxstream
from fxstream.zoo import LinearisedMonteCarlo, MonteCarlo, check, check_many, relative_errors, relative_posterior
from fxstream.zoo.catalogue import QUICK, Entry, catalogue
from fxstream.zoo.run import POSTERIORS, ZooRow, evaluate

LIBRARY = {"torchvision": "torchvision", "timm": "timm", "transformers": "transformers"}
# Monte Carlo draws per posterior. Under "all" a draw samples every weight and runs the whole model (a CNN's
# weights are millions), so in CI only the tiny transformers get it; docs/zoo.md has it for every small model.
DRAWS = {"last-2": 2000, "all": 1000}
ALL_WEIGHTS_MC = {"transformers/bert", "transformers/gpt2", "transformers/llama"}
APPROXIMATION_MEDIAN = 0.15  # the method's allowance under "all"; see the module docstring
APPROXIMATION_RATIO = 1.0    # p90 of |var / var_MC - 1|: 90% of outputs within a factor of two


@pytest.fixture(autouse=True)
def one_thread():
    """The zoo's inputs are tiny: intra-op threads only add synchronisation, which on a busy machine (two
    cores shared by several test runs) costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def entry(name: str) -> Entry:
    pytest.importorskip(LIBRARY[name.split("/")[0]], reason="the zoo's libraries are optional extras")
    found = [e for e in catalogue((name.split("/")[0],)) if e.name == name]
    assert found, f"{name} is not in the catalogue"
    return found[0]


def mc_bounds(samples: int) -> tuple[float, float]:
    """(median, p90) bounds on relative variance errors that sampling alone explains (module docstring)."""
    rse = math.sqrt(2 / (samples - 1))
    return 3 * rse, 4 * rse


@pytest.mark.parametrize("name", QUICK)
def test_zoo_model(name):
    dtype = torch.float64 if name.startswith("transformers/") else torch.float32
    built = entry(name).build().to(dtype)
    posteriors = {label: make(built.model) for label, make in POSTERIORS.items()}
    draws = {label: DRAWS[label] if label == "last-2" or name in ALL_WEIGHTS_MC else 0 for label in POSTERIORS}
    results = check_many(built.model, built.args, posteriors, example_kwargs=built.kwargs, output=built.output,
                         samples=draws, repeats=1)
    for label, result in results.items():
        assert not isinstance(result, BaseException), f"{label}: {result!r}"
        assert result.means_exact, f"{label}: mean differs from the model's forward by {result.mean_error:.2e}"
        assert result.var_finite and result.var_nonnegative, label
        if not result.mc_samples:
            continue
        median_bound, p90_bound = mc_bounds(result.mc_samples)
        if label == "all":
            median_bound, p90_bound = APPROXIMATION_MEDIAN + median_bound, APPROXIMATION_RATIO + p90_bound
        assert result.median_error <= median_bound and result.p90_error <= p90_bound, (
            f"{label}: median {result.median_error:.3f} (bound {median_bound:.3f}), "
            f"p90 {result.p90_error:.3f} (bound {p90_bound:.3f}) with {result.mc_samples} draws")


def test_monte_carlo_matches_a_closed_form():
    """The harness itself: a linear layer with Gaussian weights has output variance x^2 @ V^T + v_b."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    posterior = relative_posterior(layer, rel_std=0.1)
    v = posterior.variances
    exact = x.square() @ v["weight"].T + v["bias"]
    mc = MonteCarlo(layer, (x,), {}, v, seed=1)
    mc.run(4000)
    median, p90 = relative_errors(mc.variance(), exact)
    median_bound, p90_bound = mc_bounds(4000)
    assert median <= median_bound and p90 <= p90_bound
    result = check(layer, x, posterior, samples=4000, backend="eager")
    assert result.means_exact and result.variances_valid
    assert result.median_error <= median_bound and result.p90_error <= p90_bound


def test_linearised_monte_carlo_samples_the_glm_predictive():
    """Through a layer, linear in its parameters, the same draws give Monte Carlo's variances to rounding;
    through a tanh network, J Sigma J^T (jacrev) within Monte Carlo's error, where Monte Carlo differs."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    v = relative_posterior(layer, rel_std=0.1).variances
    sampled, linearised = MonteCarlo(layer, (x,), {}, v, seed=1), LinearisedMonteCarlo(layer, (x,), {}, v, seed=1)
    sampled.run(500)
    linearised.run(500)
    torch.testing.assert_close(linearised.variance(), sampled.variance(), rtol=1e-9, atol=0)

    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double().eval()
    x = torch.randn(8, 3, dtype=torch.float64)
    v = relative_posterior(model, rel_std=2.0).variances  # broad: Monte Carlo leaves the linearisation
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, {**params, **p}, (x,)))(params)
    glm = sum(j.reshape(*j.shape[:2], -1).square() @ v[n].reshape(-1) for n, j in jac.items())
    linearised = LinearisedMonteCarlo(model, (x,), {}, v, seed=2)
    linearised.run(4000)
    median, p90 = relative_errors(linearised.variance(), glm)
    median_bound, p90_bound = mc_bounds(4000)
    assert median <= median_bound and p90 <= p90_bound
    sampled = MonteCarlo(model, (x,), {}, v, seed=2)
    sampled.run(4000)
    assert relative_errors(sampled.variance(), glm)[0] > 2 * median_bound  # nonlinear: GLM is not MC here


def test_check_many_keeps_each_posteriors_error():
    """check_many compiles each posterior from one Dynamo capture; a posterior the pipeline rejects is that
    posterior's error only."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    good = relative_posterior(model)
    wrong_shape = fxstream.Diagonal({"0.weight": torch.ones(3, 3, dtype=torch.float64)})
    results = check_many(model, x, {"good": good, "wrong": wrong_shape}, samples=0)
    assert isinstance(results["wrong"], fxstream.PosteriorMismatchError)
    assert results["good"].ok and results["good"].mc_skipped == "not asked"


def test_a_failing_model_is_a_row_not_a_crash():
    def broken():
        raise RuntimeError("this architecture does not build")

    row = evaluate(Entry("test/broken", "torchvision", broken))
    assert not row.ok and row.status.startswith("build failed: RuntimeError: this architecture does not build")

    class DataDependent(torch.nn.Module):  # Python control flow on a tensor's value: a graph break
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.linear(x)
            return h.relu() if h.sum() > 0 else h.tanh()

    from fxstream.zoo.catalogue import Built

    row = evaluate(Entry("test/branch", "torchvision", lambda: Built(DataDependent(), (torch.randn(2, 4),))),
                   samples={"last-2": 200, "all": 200})
    assert isinstance(row, ZooRow) and not row.ok and not row.results
    assert {name: error[0] for name, error in row.errors.items()} == {name: "GraphBreakError" for name in POSTERIORS}


def test_catalogue_covers_the_brief():
    """Every torchvision classifier, >= 20 timm families, >= 25 transformers families (built lazily)."""
    for library in LIBRARY.values():
        pytest.importorskip(library)
    from fxstream._compat import make_torchvision_importable

    make_torchvision_importable()
    import torchvision

    entries = catalogue()
    by_source = {s: [e for e in entries if e.source == s] for s in LIBRARY}
    listed = set(torchvision.models.list_models(module=torchvision.models))
    assert {e.name.split("/", 1)[1] for e in by_source["torchvision"]} == listed
    assert len({e.family for e in by_source["timm"]}) >= 20
    assert len({e.family for e in by_source["transformers"]}) >= 25
    assert set(QUICK) <= {e.name for e in entries}
