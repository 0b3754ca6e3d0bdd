"""The ``streamline`` torch.compile backend and the output contract.

Dynamo drops any extra outputs a backend returns, so the compiled callable
returns the model's usual outputs (the means) and files each output's
covariance in a weak table keyed by the output tensor itself;
:func:`fxstream.predictive` reads it back. Nothing outlives the output tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx
from torch.utils.weak import WeakIdKeyDictionary

from .errors import FxstreamError, NoPredictiveError, PosteriorMismatchError
from .passes import CapturedGraph, PairedGraph, PruneReport, Source, capture, lower, pair, prune
from .posterior import Posterior
from .predictive import Predictive
from .rules.linearise import full_to_diag
from .rules import DEFAULT_RULE_OPTIONS, RULE_OPTIONS
from .rules.residual import warn_uncovered_joins

_PREDICTIVES: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class StreamlineOptions:
    """What the backend needs; ``torch.compile(..., options={...})`` takes the same keys."""

    posterior: Posterior | None = None
    likelihood: str | None = None
    sigma_noise: float | None = None
    input_var: torch.Tensor | float | None = None
    input_cov: torch.Tensor | None = None
    activation_cov: str = "diag"
    rule_options: dict[str, str] = field(default_factory=dict)
    backend: str = "inductor"
    outputs: list[int] | None = None
    model: torch.nn.Module | None = None
    on_compile: Callable[[Streamlined], None] | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> StreamlineOptions:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise FxstreamError(f"unknown streamline option(s) {unknown}; known: {sorted(known)}")
        made = cls(**options)
        made.check()
        return made

    def check(self) -> None:
        for name, choice in self.rule_options.items():
            if name not in RULE_OPTIONS or choice not in RULE_OPTIONS[name]:
                allowed = {key: list(values) for key, values in RULE_OPTIONS.items()}
                raise FxstreamError(f"unknown rule option {name}={choice!r}; allowed: {allowed}")
        if self.activation_cov not in ("diag", "full"):
            raise FxstreamError(f"activation_cov must be 'diag' or 'full', got '{self.activation_cov}'")
        if self.likelihood not in (None, "classification", "regression"):
            raise FxstreamError(
                f"likelihood must be 'classification', 'regression' or None, got '{self.likelihood}'"
            )
        if self.input_var is not None and self.input_cov is not None:
            raise FxstreamError("give input_var or input_cov, not both")
        if self.posterior is None and self.input_var is None and self.input_cov is None:
            raise FxstreamError("nothing is uncertain: give a posterior, input_var or input_cov")
        if self.posterior is not None and not isinstance(self.posterior, Posterior):
            raise FxstreamError(
                f"posterior must be an fxstream posterior such as fxstream.Diagonal, got "
                f"{type(self.posterior).__name__}"
            )


@dataclass
class Streamlined:
    """One compiled graph: the pipeline's products, kept for inspection."""

    captured: CapturedGraph
    paired: PairedGraph
    report: PruneReport
    options: StreamlineOptions = field(repr=False)
    compiled: Callable = field(repr=False, default=None)  # type: ignore[assignment]

    def __call__(self, *args):
        outputs = list(self.compiled(*args))
        means = outputs[: self.paired.num_outputs]
        covs = outputs[self.paired.num_outputs:]
        for index, cov, kind in zip(self.paired.cov_outputs, covs, self.paired.cov_kinds):
            _PREDICTIVES[means[index]] = _moments(means[index], cov, kind, self.options)
        return means


def _moments(mean: torch.Tensor, cov: torch.Tensor, kind: str, options: StreamlineOptions) -> tuple:
    """What a Predictive holds besides the mean: (var, cov, likelihood, sigma_noise).

    The table of outputs keeps this rather than the Predictive itself: a value
    that referenced its weak key (the mean) would keep both alive for ever.
    """
    if kind == "full":
        return full_to_diag(cov, mean.shape), cov.reshape(*mean.shape, *mean.shape[1:]), \
            options.likelihood, options.sigma_noise
    return cov, None, options.likelihood, options.sigma_noise


def predictive(output: torch.Tensor) -> Predictive:
    """The Predictive of a tensor returned by a streamlined model (torch.compile path)."""
    found = _PREDICTIVES.get(output) if isinstance(output, torch.Tensor) else None
    if found is None:
        raise NoPredictiveError(
            "this tensor was not returned by a streamlined model: pass an output tensor of "
            "torch.compile(model, backend='streamline', options=...) itself, not a copy or a "
            "tensor computed from it. If the model has a graph break, its outputs come from a graph "
            "without uncertainty: compile with fullgraph=True to find the break"
        )
    return Predictive(output, *found)


def _parameter_names(captured: CapturedGraph, model: torch.nn.Module | None) -> dict[str, str]:
    """placeholder name -> parameter name, by identity with the model when we have it."""
    canonical = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
    names = {}
    for placeholder in captured.placeholders:
        if placeholder.role == "parameter":
            name = canonical.get(id(placeholder.tensor), placeholder.qualified_name)
            names[placeholder.name] = name
    return names


def _sources(captured: CapturedGraph, options: StreamlineOptions) -> dict[str, Source]:
    sources: dict[str, Source] = {}
    posterior = options.posterior
    if posterior is not None:
        by_name = _parameter_names(captured, options.model)
        tensors = {by_name[p.name]: p.tensor for p in captured.placeholders if p.name in by_name}
        wanted = set(posterior.parameter_names())
        if options.model is None:
            missing = sorted(wanted - set(tensors))
            if missing:
                raise PosteriorMismatchError(
                    f"the posterior names parameter '{missing[0]}', which this captured graph does not use "
                    f"(it uses: {sorted(tensors)[:8]}{' ...' if len(tensors) > 8 else ''}). Either the name is "
                    "wrong, or the model has a graph break that split it into several graphs: compile with "
                    "fullgraph=True to see the break, since covariance cannot cross one"
                )
            posterior.validate(tensors)
        for placeholder_name, name in by_name.items():
            if name in wanted:
                cov = posterior.covariance(name)
                param = tensors[name]
                sources[placeholder_name] = Source(
                    cov.kind, tuple(t.to(dtype=param.dtype, device=param.device) for t in cov.tensors)
                )
    given = options.input_var if options.input_var is not None else options.input_cov
    if given is not None:
        inputs = [p for p in captured.inputs() if torch.is_floating_point(p.tensor)]
        if not inputs:
            raise FxstreamError("input_var / input_cov given, but the model has no floating-point input")
        first = inputs[0]
        buffer = torch.as_tensor(given, dtype=first.tensor.dtype, device=first.tensor.device)
        _check_input_uncertainty(buffer, first.tensor, diagonal=options.input_var is not None)
        sources[first.name] = Source("diag" if options.input_var is not None else "full", (buffer,))
    return sources


def _check_input_uncertainty(buffer: torch.Tensor, x: torch.Tensor, diagonal: bool) -> None:
    """input_var must broadcast to the input; input_cov must be (N, N) or (B, N, N), N per sample."""
    if diagonal:
        if (buffer < 0).any():
            raise FxstreamError("input_var has negative entries; variances must be >= 0")
        try:
            torch.broadcast_shapes(buffer.shape, x.shape)
        except RuntimeError:
            raise FxstreamError(
                f"input_var of shape {tuple(buffer.shape)} does not broadcast to the input's shape {tuple(x.shape)}"
            ) from None
        return
    n = x[0].numel()
    if buffer.shape not in ((n, n), (x.shape[0], n, n)):
        raise FxstreamError(
            f"input_cov must have shape ({n}, {n}) or ({x.shape[0]}, {n}, {n}) for an input of shape "
            f"{tuple(x.shape)}, got {tuple(buffer.shape)}"
        )


def compile_streamlined(gm: torch.fx.GraphModule, example_inputs: list, options: StreamlineOptions) -> Streamlined:
    """Run the pipeline capture -> pair -> prune -> lower on one Dynamo graph."""
    captured = capture(gm, example_inputs)
    paired = pair(captured, _sources(captured, options), options.activation_cov, options.outputs, options.rule_options)
    report = prune(paired)
    if options.rule_options.get("residual") == "linearised":
        _report_residual_joins(captured, paired, options)
    streamlined = Streamlined(captured, paired, report, options)
    streamlined.compiled = lower(paired.graph_module, example_inputs, options.backend)
    if options.on_compile is not None:
        options.on_compile(streamlined)
    return streamlined


def _report_residual_joins(captured: CapturedGraph, paired: PairedGraph, options: StreamlineOptions) -> None:
    """Warn once where residual="linearised" left joins of the pruned graph with the independent add."""
    tags = [node.meta.get("fxstream", {}) for node in paired.graph_module.graph.nodes]
    tags = [tag for tag in tags if tag.get("role") == "cov"]
    inputs = {p.name for p in captured.inputs()}
    uncertain = {tag["of"] for tag in tags if tag["rule"] != "source" or tag["of"] in inputs}
    covered = {tag["of"] for tag in tags if tag["rule"] in ("residual_join", "elementwise_region")}
    warn_uncovered_joins(captured.graph_module.graph, uncertain, covered,
                         {**DEFAULT_RULE_OPTIONS, **options.rule_options}, options.activation_cov)


def streamline_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None):
    """torch.compile backend: ``torch.compile(model, backend="streamline", options={...})``."""
    return compile_streamlined(gm, example_inputs, StreamlineOptions.from_mapping(options))

