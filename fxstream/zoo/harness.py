"""Check fxstream on a model: exact means, valid variances, agreement with Monte Carlo, and timings.

``check(model, example_inputs, posterior)`` streamlines ``model`` under
``posterior``, runs it once on ``example_inputs`` and compares the result with

- the model's own deterministic forward (the predictive mean must be exactly
  the posterior-mean network's output, up to float rounding);
- Monte Carlo over the same diagonal Gaussian posterior: weights drawn, the
  unchanged model run on each draw (``torch.func.functional_call``), the
  empirical variance of the output taken.

It is the zoo's check (``benchmarks/bench_zoo.py``, ``tests/test_zoo.py``) and
works on any model and posterior a user brings.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, jvp, vmap

from ..api import select_output
from ..backend import StreamlineOptions, compile_streamlined, predictive
from ..errors import FxstreamError, GraphBreakError
from ..passes.capture import CAPTURING
from ..posterior import Diagonal, Posterior
from ..predictive import Predictive
from ..rules import DEFAULT_RULE_OPTIONS, RULE_OPTIONS


@dataclass
class ZooResult:
    """What :func:`check` measured for one model and one posterior.

    ``median_error`` / ``p90_error``: median and 90th percentile over the
    output's elements of |var - var_MC| / var_MC. ``mc_rse`` is the relative
    standard error of a Monte Carlo variance estimate from ``mc_samples``
    Gaussian draws, sqrt(2 / (N - 1)): the part of those errors that sampling
    alone explains. They are None where Monte Carlo was skipped
    (``mc_skipped`` says why).
    """

    mean_error: float                 # max |mean - forward| / max |forward|
    mean_tolerance: float
    var_finite: bool
    var_nonnegative: bool
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    uncertain_parameters: int         # number of parameter tensors in the posterior
    uncertain_numel: int              # number of uncertain weights
    streamline_s: float               # streamline() plus the first call (capture, rewrite, compile)
    call_s: float                     # median time of a later call
    forward_s: float                  # median time of the model's own forward
    median_error: float | None = None
    p90_error: float | None = None
    mc_samples: int = 0
    mc_s: float = 0.0
    mc_skipped: str | None = None
    median_ratio: float | None = None  # median of var / var_MC: below 1, fxstream's variance is the smaller
    var_mean: float = float("nan")   # mean predicted variance, for scale
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def means_exact(self) -> bool:
        return self.mean_error <= self.mean_tolerance

    @property
    def variances_valid(self) -> bool:
        return self.var_finite and self.var_nonnegative

    @property
    def ok(self) -> bool:
        """Means exact and variances finite and nonnegative (Monte Carlo agreement is reported, not judged)."""
        return self.means_exact and self.variances_valid

    @property
    def mc_rse(self) -> float | None:
        return math.sqrt(2.0 / (self.mc_samples - 1)) if self.mc_samples > 1 else None

    @property
    def time_ratio(self) -> float:
        """A streamlined call's time over the deterministic forward's."""
        return self.call_s / self.forward_s if self.forward_s > 0 else float("nan")


def diagonal_variances(posterior: Posterior) -> dict[str, torch.Tensor]:
    """Per-entry marginal variances of every uncertain parameter (exact for any fxstream posterior)."""
    diagonal = posterior if isinstance(posterior, Diagonal) else posterior.to_diagonal()
    return dict(diagonal.variances)


def floating_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``model.named_parameters()`` (tied weights once), floating point only."""
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


def relative_variance(p: torch.Tensor, rel_std: float = 0.02, floor: float = 1e-3) -> torch.Tensor:
    """(rel_std |w|)^2 plus a floor of (floor * rel_std * mean|w|)^2, so zero entries stay (barely) uncertain."""
    w = p.detach()
    scale = w.abs().mean() if w.numel() else w.new_zeros(())
    return (rel_std * w.abs()).square() + (floor * rel_std * scale).square() + torch.finfo(w.dtype).tiny


def relative_posterior(model: torch.nn.Module, names: Sequence[str] | None = None, rel_std: float = 0.02,
                       floor: float = 1e-3) -> Diagonal:
    """A diagonal posterior with ``rel_std`` relative standard deviation on ``names`` (default: every
    floating parameter)."""
    params = dict(floating_parameters(model))
    names = list(params) if names is None else list(names)
    return Diagonal({n: relative_variance(params[n], rel_std, floor) for n in names})


def last_parameters(model: torch.nn.Module, k: int = 2) -> list[str]:
    """Names of the last ``k`` floating parameters in ``named_parameters()`` order (usually the head)."""
    return [n for n, _ in floating_parameters(model)][-k:]


def relative_errors(var: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Median and 90th percentile over elements of |var - reference| / reference.

    Elements whose reference variance is below 1e-12 of the largest are left
    out (outputs the posterior does not reach); if none is left, both are 0
    when ``var`` is zero there too.
    """
    var, reference = var.detach().double().flatten(), reference.detach().double().flatten()
    top = reference.abs().max()
    keep = reference > 1e-12 * top if top > 0 else torch.zeros_like(reference, dtype=torch.bool)
    if not keep.any():
        bad = float(var.abs().max()) if var.numel() else 0.0
        return (0.0, 0.0) if bad == 0 else (math.inf, math.inf)
    rel = (var[keep] - reference[keep]).abs() / reference[keep]
    return rel.median().item(), rel.quantile(0.9).item()


def median_ratio(var: torch.Tensor, reference: torch.Tensor) -> float:
    """Median over elements of var / reference (below 1: fxstream's variance is the smaller), over the
    elements :func:`relative_errors` keeps."""
    var, reference = var.detach().double().flatten(), reference.detach().double().flatten()
    top = reference.abs().max()
    keep = reference > 1e-12 * top if top > 0 else torch.zeros_like(reference, dtype=torch.bool)
    return (var[keep] / reference[keep]).median().item() if keep.any() else float("nan")


def _timed(fn, repeats: int, warmup: int = 1) -> tuple[Any, float]:
    """The last result of ``fn`` and the median wall time over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


class MonteCarlo:
    """Empirical output variance over weights drawn from a diagonal Gaussian posterior.

    Draws are made in float32 (several times faster than float64 on a CPU)
    and cast to the parameter's dtype. The model runs on each draw through
    ``torch.func.functional_call``: a chunk of draws batched by
    ``torch.func.vmap`` (which computes the part of the network before the
    first uncertain parameter once) or one draw at a time, whichever the
    first two chunks show is faster (one at a time where vmap cannot run the
    model). Sums are kept in float64 around the first draw's output, so the
    variance does not cancel against a large mean.
    """

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any],
                 variances: Mapping[str, torch.Tensor], output: str | int | None = None, seed: int = 0,
                 chunk_bytes: int = 2**28) -> None:
        params = dict(model.named_parameters())
        self.model, self.args, self.kwargs, self.output = model, args, dict(kwargs), output
        self.means = {n: params[n].detach() for n in variances}
        self.stds = {n: variances[n].detach().to(params[n].dtype).sqrt() for n in variances}
        self.generator = torch.Generator().manual_seed(seed)
        per_draw = sum(p.numel() * p.element_size() for p in self.means.values())
        self.chunk = max(1, min(1024, chunk_bytes // max(per_draw, 1)))
        self.mode: str | None = None  # "vmap" or "loop", chosen on the first chunks
        self.seconds_per_draw = {"vmap": math.inf, "loop": math.inf}
        self.count, self.shift, self.total, self.square = 0, None, 0.0, 0.0
        self.last_seconds_per_draw = math.inf  # of the last chunk, drawing included

    def _draw(self, n: int) -> dict[str, torch.Tensor]:
        drawn = {}
        for name, mean in self.means.items():
            noise = torch.randn((n, *mean.shape), generator=self.generator).to(mean.dtype)
            drawn[name] = noise.mul_(self.stds[name]).add_(mean)
        return drawn

    def _forward(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return select_output(functional_call(self.model, params, self.args, self.kwargs), self.output)

    def _batch(self, n: int, mode: str) -> torch.Tensor:
        drawn = self._draw(n)
        start = time.perf_counter()
        if mode == "vmap":
            out = vmap(self._forward, randomness="different")(drawn)
        else:
            out = torch.stack([self._forward({k: v[i] for k, v in drawn.items()}) for i in range(n)])
        self.seconds_per_draw[mode] = (time.perf_counter() - start) / n
        return out

    @torch.no_grad()
    def run(self, samples: int) -> None:
        """Add ``samples`` draws to the running sums."""
        with warnings.catch_warnings():
            # vmap's "no batching rule for <op>, performance drop" (SDPA, ...): its results are still right.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            done = 0
            while done < samples:
                n = min(self.chunk, samples - done)
                start = time.perf_counter()
                self._add(self._next(n))
                self.last_seconds_per_draw = (time.perf_counter() - start) / n
                done += n

    def _next(self, n: int) -> torch.Tensor:
        if self.mode is not None:
            return self._batch(n, self.mode)
        if n == 1:
            self.mode = "loop"
            return self._batch(n, "loop")
        try:
            out = self._batch(n, "vmap")
        except Exception:  # noqa: BLE001 - a model vmap cannot batch runs one draw at a time
            self.mode = "loop"
            return self._batch(n, "loop")
        # Two draws one at a time tell whether a loop beats vmap (batched convolution weights can be slow).
        out = torch.cat([out, self._batch(2, "loop")])
        self.mode = min(self.seconds_per_draw, key=self.seconds_per_draw.get)
        return out

    def _add(self, out: torch.Tensor) -> None:
        out = out.double()
        if self.shift is None:
            self.shift = out[0].clone()
        out = out - self.shift
        self.total = self.total + out.sum(0)
        self.square = self.square + out.square().sum(0)
        self.count += out.shape[0]

    def variance(self) -> torch.Tensor:
        mean = self.total / self.count
        return (self.square - self.count * mean.square()) / (self.count - 1)


class LinearisedMonteCarlo(MonteCarlo):
    """Monte Carlo over the network linearised at the posterior mean, f(mu) + J (theta - mu).

    Its output variance is the linearised (GLM) predictive's, J Sigma J^T,
    sampled by one JVP per draw (no Jacobian is formed). Beside
    :class:`MonteCarlo` it splits a gap to Monte Carlo into the
    linearisation's share (this against Monte Carlo) and the rules' (a
    streamlined model against this). Forward-mode AD must reach every op:
    PyTorch has none for the CPU's fused attention kernels, so run a
    Hugging Face model with ``attn_implementation="eager"``.
    """

    def _forward(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tangents = {name: params[name] - mean for name, mean in self.means.items()}
        return jvp(lambda p: super(LinearisedMonteCarlo, self)._forward(p), (self.means,), (tangents,))[1]


def check(model: torch.nn.Module, example_inputs: tuple | torch.Tensor, posterior: Posterior, *,
          example_kwargs: Mapping[str, Any] | None = None, output: str | int | None = None,
          samples: int = 1000, mc_seconds: float | None = None, min_samples: int = 100,
          backend: str = "eager", repeats: int = 3, seed: int = 0, **streamline_options: Any) -> ZooResult:
    """Streamline ``model`` under ``posterior`` and compare with its forward and with Monte Carlo.

    Args:
        model: the model, in eval mode, unchanged.
        example_inputs: positional inputs of one call (a tensor or a tuple).
        posterior: an fxstream posterior. Monte Carlo needs a diagonal one (``Diagonal``, or
            ``select`` of one); for others only the means and the variances' validity are checked.
        example_kwargs: keyword inputs of the call.
        output: which output to predict for models returning several (as in ``streamline``).
        samples: Monte Carlo draws (0: skip Monte Carlo).
        mc_seconds: a time budget for Monte Carlo: fewer draws are made if ``samples`` would
            take longer, and none if fewer than ``min_samples`` fit.
        backend, **streamline_options: the options of :func:`fxstream.streamline`.
        repeats: calls timed (median) for the streamlined model and the plain forward.

    Errors from fxstream (``UnsupportedOpError``, ``GraphBreakError``, ...) propagate.
    """
    result = check_many(model, example_inputs, {"posterior": posterior}, example_kwargs=example_kwargs,
                        output=output, samples=samples, mc_seconds=mc_seconds, min_samples=min_samples,
                        backend=backend, repeats=repeats, seed=seed, **streamline_options)["posterior"]
    if isinstance(result, BaseException):
        raise result.with_traceback(result.__traceback__)
    return result


def check_many(model: torch.nn.Module, example_inputs: tuple | torch.Tensor, posteriors: Mapping[str, Posterior], *,
               example_kwargs: Mapping[str, Any] | None = None, output: str | int | None = None,
               samples: int | Mapping[str, int] = 1000, mc_seconds: float | None = None, min_samples: int = 100,
               backend: str = "eager", repeats: int = 3, seed: int = 0,
               **streamline_options: Any) -> dict[str, ZooResult | BaseException]:
    """:func:`check` for several posteriors of one model, from one Dynamo capture.

    Dynamo's trace of the model is most of what ``streamline`` costs on a large
    CNN, and it does not depend on the posterior: the graph is captured once
    and the rest of the pipeline (``fxstream.backend.compile_streamlined``:
    re-trace to ATen, pair, prune, lower, exactly what
    ``fxstream.streamline`` runs) runs once per posterior. Each posterior's
    ``streamline_s`` is the shared capture plus its own rewrite and first call.

    Returns, per posterior name, a :class:`ZooResult` or the exception that
    posterior raised (a graph break or a failing model forward raises for all).
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if model.training:
        raise FxstreamError("the model is in training mode; call model.eval() first")
    with torch.no_grad():
        expected, forward_s = _timed(lambda: select_output(model(*args, **kwargs), output), repeats)
    results: dict[str, ZooResult | BaseException] = {}
    options: dict[str, StreamlineOptions] = {}
    for name, posterior in posteriors.items():
        try:
            options[name] = _options(model, posterior, backend, streamline_options)
        except Exception as error:  # noqa: BLE001 - this posterior's result
            results[name] = error
    predictives, timings = _run_streamlined(model, args, kwargs, output, options, repeats, results)
    for name, (predictive, (streamline_s, call_s)) in ((n, (predictives[n], timings[n])) for n in predictives):
        variances = diagonal_variances(posteriors[name])
        results[name] = _result(predictive, expected, variances, streamline_s, call_s, forward_s)
    del predictives
    sample_counts = samples if isinstance(samples, Mapping) else {name: samples for name in posteriors}
    for name, result in results.items():
        if isinstance(result, ZooResult) and not _is_diagonal(posteriors[name]):
            result.extra.pop("var")
            result.mc_skipped = "Monte Carlo samples diagonal posteriors only (KFAC, dense, low-rank: not here)"
        elif isinstance(result, ZooResult):
            _monte_carlo(result, model, args, kwargs, diagonal_variances(posteriors[name]), output,
                         sample_counts[name], mc_seconds, min_samples, seed)
    return {name: results[name] for name in posteriors}


def _is_diagonal(posterior: Posterior) -> bool:
    """Whether every entry of ``posterior`` is independent, so that its marginals are the posterior."""
    return all(posterior.covariance(name).kind == "param_diag" for name in posterior.parameter_names())


def _options(model: torch.nn.Module, posterior: Posterior, backend: str, extra: Mapping[str, Any]) -> StreamlineOptions:
    """The options ``fxstream.streamline(model, posterior, backend=..., **extra)`` would compile with."""
    rule_options = {**DEFAULT_RULE_OPTIONS, **{key: extra[key] for key in RULE_OPTIONS if key in extra}}
    rest = {key: value for key, value in extra.items() if key not in RULE_OPTIONS}
    posterior.validate(dict(model.named_parameters()))
    made = StreamlineOptions(posterior=posterior, backend=backend, rule_options=rule_options, model=model, **rest)
    made.check()
    return made


def _run_streamlined(model, args, kwargs, output, options: Mapping[str, StreamlineOptions], repeats: int,
                     errors: dict[str, BaseException]) -> tuple[dict[str, Predictive], dict[str, tuple[float, float]]]:
    """Capture once, compile every posterior's graph, run each: predictives and (streamline_s, call_s)."""
    compiled: dict[str, Any] = {}
    rewrite_s: dict[str, float] = {}
    current: list[str | None] = [None]

    def backend(gm, example_inputs):
        for name, opts in options.items():
            start = time.perf_counter()
            try:
                compiled[name] = compile_streamlined(gm, example_inputs, opts)
            except Exception as error:  # noqa: BLE001 - this posterior's result
                errors[name] = error
            rewrite_s[name] = time.perf_counter() - start
        if not compiled:
            raise next(iter(errors.values()))
        current[0] = next(iter(compiled))  # the first call runs the first graph that compiled

        def run(*graph_inputs):
            return compiled[current[0]](*graph_inputs)

        return run

    def selected_output(*a, **k):
        return select_output(model(*a, **k), output)

    predictives: dict[str, Predictive] = {}
    timings: dict[str, tuple[float, float]] = {}
    if not options:
        return predictives, timings
    function = torch.compile(selected_output, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096), \
            CAPTURING:
        start = time.perf_counter()
        try:
            out = function(*args, **kwargs)
            failure = None
        except Exception as error:  # noqa: BLE001 - reported per posterior
            out, failure = None, _unwrap(error)
        elapsed = time.perf_counter() - start
        if not compiled:  # the capture failed (graph break, ...) or no posterior compiled: each keeps its error
            for name in options:
                errors.setdefault(name, failure)
            return predictives, timings
        capture_s = elapsed - sum(rewrite_s.values())  # Dynamo's trace plus the first graph's first run
        for name in compiled:
            current[0] = name
            if name != next(iter(compiled)):
                start = time.perf_counter()
                try:
                    out, failure = function(*args, **kwargs), None
                except Exception as error:  # noqa: BLE001
                    failure = _unwrap(error)
                elapsed = time.perf_counter() - start
            else:
                elapsed = 0.0  # its first run is counted in capture_s
            if failure is not None:
                errors[name] = failure
                continue
            try:
                predictives[name] = predictive(out)
                _, call_s = _timed(lambda: function(*args, **kwargs), repeats, warmup=0)
            except Exception as error:  # noqa: BLE001
                errors[name] = _unwrap(error)
                continue
            timings[name] = (capture_s + rewrite_s[name] + elapsed, call_s)
    return predictives, timings


def _unwrap(error: BaseException) -> BaseException:
    """The error a user of ``fxstream.streamline`` would see (Dynamo wraps backend failures)."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(error, torch._dynamo.exc.BackendCompilerFailed) and inner is not None:
        return inner
    if isinstance(error, torch._dynamo.exc.Unsupported):
        return GraphBreakError(
            "the model cannot be captured as a single graph, and covariance cannot cross a graph "
            f"break. Dynamo reports: {str(error).splitlines()[0]}"
        )
    return error


def _result(predictive: Predictive, expected: torch.Tensor, variances: Mapping[str, torch.Tensor],
            streamline_s: float, call_s: float, forward_s: float) -> ZooResult:
    mean, var = predictive.mean, predictive.var
    scale = expected.detach().abs().max().double().clamp_min(torch.finfo(expected.dtype).tiny)
    same_shape = mean.shape == expected.shape
    return ZooResult(
        mean_error=((mean.double() - expected.double()).abs().max() / scale).item() if same_shape else math.inf,
        mean_tolerance=mean_tolerance(expected.dtype),
        var_finite=bool(torch.isfinite(var).all()),
        var_nonnegative=bool((var >= 0).all()),
        output_shape=tuple(expected.shape),
        dtype=expected.dtype,
        uncertain_parameters=len(variances),
        uncertain_numel=sum(v.numel() for v in variances.values()),
        streamline_s=streamline_s,
        call_s=call_s,
        forward_s=forward_s,
        var_mean=var.double().mean().item(),
        extra={"var": var.detach()},
    )


def _monte_carlo(result: ZooResult, model, args, kwargs, variances, output, samples: int, mc_seconds: float | None,
                 min_samples: int, seed: int) -> None:
    """Fill the Monte Carlo fields of ``result`` (draws within the time budget)."""
    var = result.extra.pop("var")
    if samples <= 0:
        result.mc_skipped = "not asked"
        return
    mc = MonteCarlo(model, args, kwargs, variances, output=output, seed=seed)
    if mc_seconds is not None:
        # A draw costs at least drawing every uncertain weight (~5e7 normals/s on a CPU core) and its share of a
        # forward (vmap runs a chunk of draws in about one): skip before drawing where even that leaves no room.
        estimate = result.uncertain_numel / 5e7 + result.forward_s / mc.chunk
        if estimate * min_samples > mc_seconds:
            result.mc_skipped = f"a draw takes about {estimate:.2g} s: {min_samples} do not fit in {mc_seconds:g} s"
            return
    start = time.perf_counter()
    mc.run(min(mc.chunk, samples))  # the first chunk also chooses between vmap and a loop
    remaining = max(samples - mc.count, 0)
    if mc_seconds is not None:
        left = mc_seconds - (time.perf_counter() - start)
        remaining = min(remaining, int(max(left, 0) / mc.last_seconds_per_draw))
        if mc.count + remaining < min_samples:
            result.mc_skipped = (f"one draw takes {mc.last_seconds_per_draw:.2g} s: {min_samples} do not fit in "
                                 f"{mc_seconds:g} s")
            return
    mc.run(remaining)
    result.mc_s = time.perf_counter() - start
    result.mc_samples = mc.count
    reference = mc.variance()
    result.median_error, result.p90_error = relative_errors(var, reference)
    result.median_ratio = median_ratio(var, reference)


def mean_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for "the mean equals the forward": float rounding of a reordered computation."""
    return 1e-4 if torch.finfo(dtype).bits <= 32 else 1e-10
