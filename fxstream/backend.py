"""The ``streamline`` torch.compile backend and the output contract.

Dynamo drops any extra outputs a backend returns, so the compiled callable
returns the model's usual outputs (the means) and files each output's
covariance in a weak table keyed by the output tensor itself;
:func:`fxstream.predictive` reads it back. Nothing outlives the output tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx
from torch.utils.weak import WeakIdKeyDictionary

from .errors import FxstreamError, FxstreamWarning, NoPredictiveError
from .passes import CapturedGraph, PairedGraph, PruneReport, capture, compile_graph
from .passes.joins import ROLE
from .pipeline import lower, rewrite
from .posterior import Posterior
from .predictive import Predictive
from .rules.linearise import full_to_diag
from .rules import DEFAULT_RULE_OPTIONS, RULE_OPTIONS
from .rules.patterns import SOFTMAX
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
        if self.rule_options.get("joins") == "exact" and self.activation_cov != "full":
            raise FxstreamError("joins='exact' carries cross-covariances between activations, which needs "
                                "activation_cov='full'; for diagonal activations use residual='linearised'")
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
        if self.likelihood == "classification" and self.sigma_noise is not None:
            warnings.warn("sigma_noise is the observation noise of regression; with likelihood='classification' "
                          "it has no effect", FxstreamWarning, stacklevel=3)
        for option, what in (("residual", "branch covariance"), ("gates", "factors' covariance")):
            if self.rule_options.get(option) == "linearised" and self.activation_cov == "full":
                warnings.warn(f"{option}='linearised' adds the {what} for diagonal activations only; with "
                              f"activation_cov='full' it has no effect (joins='exact' adds every join's "
                              f"cross-covariance there)", FxstreamWarning, stacklevel=3)
        if self.rule_options.get("interpolation") == "independent" and self.activation_cov == "full":
            warnings.warn("interpolation='independent' chooses how diagonal activations are interpolated; with "
                          "activation_cov='full' interpolations carry the full covariance exactly and it has no "
                          "effect", FxstreamWarning, stacklevel=3)


@dataclass
class Streamlined:
    """One compiled graph: the pipeline's products, kept for inspection.

    ``paired`` is the pruned graph (covariance nodes call their rules);
    ``lowered`` the same computation in plain ATen ops, which ``compiled`` runs.
    """

    captured: CapturedGraph
    paired: PairedGraph
    report: PruneReport
    options: StreamlineOptions = field(repr=False)
    lowered: torch.fx.GraphModule = field(repr=False, default=None)  # type: ignore[assignment]
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


def compile_streamlined(gm: torch.fx.GraphModule, example_inputs: list, options: StreamlineOptions) -> Streamlined:
    """Run the pipeline capture -> decompose -> pair -> prune -> lower on one Dynamo graph, then compile it."""
    captured = capture(gm, example_inputs)
    rewritten = rewrite(captured, options)
    if options.rule_options.get("residual") == "linearised":
        _report_residual_joins(captured, rewritten.paired, options)
    _report_correlated_parameters(rewritten.paired)
    if options.rule_options.get("joins") == "exact":
        _report_shared_parameters(captured, rewritten.paired)
    _report_idle_options(rewritten.paired, options)
    lowered = lower(rewritten.paired)
    streamlined = Streamlined(captured, rewritten.paired, rewritten.report, options, lowered,
                              compile_graph(lowered, example_inputs, options.backend))
    if options.on_compile is not None:
        options.on_compile(streamlined)
    return streamlined


def _report_correlated_parameters(paired: PairedGraph) -> None:
    """Warn once where an op copied or mixed the entries of a parameter before they met data (see pair pass)."""
    modules = sorted({node.meta["fxstream"]["marginal"] for node in paired.graph_module.graph.nodes
                      if "marginal" in node.meta.get("fxstream", {})})
    if modules:
        warnings.warn(
            f"{len(modules)} module(s) copy or mix the entries of an uncertain parameter before it meets data "
            f"({', '.join(modules[:4])}{', ...' if len(modules) > 4 else ''}): each entry keeps its variance, "
            "but the correlation between the copies is dropped. Leave those parameters out of the posterior "
            "if that matters for your use.", FxstreamWarning, stacklevel=2)


def _report_shared_parameters(captured: CapturedGraph, paired: PairedGraph) -> None:
    """Warn where joins="exact" could not carry the covariance between two reads of one uncertain parameter
    (tied weights; see passes/joins.py), naming the parameter and why."""
    names = {p.name: p.qualified_name for p in captured.placeholders}
    dropped = [f"{names.get(node.name, node.name)} ({node.meta[ROLE]['reason']})"
               for node in paired.graph_module.graph.find_nodes(op="placeholder")
               if node.meta.get(ROLE, {}).get("tie") == "dropped"]
    if dropped:
        warnings.warn(
            f"joins='exact' carries the covariance between the reads of a parameter read by more than one op "
            f"(tied weights), but not for {', '.join(dropped)}: that covariance is dropped there, so the "
            "predictive is not J Sigma J^T. Leave the parameter out of the posterior (or untie it) where that "
            "matters.", FxstreamWarning, stacklevel=2)


# The ops whose covariance the "attention" and "norm" rule options change (the eager attention's softmax and a
# hand-written RMSNorm's join are found by the patterns of rules/patterns.py and tagged by their rules).
_OPTION_TARGETS = {
    "attention": {torch.ops.aten.scaled_dot_product_attention.default, *SOFTMAX},
    "norm": {torch.ops.aten.layer_norm.default, torch.ops.aten.group_norm.default},
    "interpolation": set(),
}
_OPTION_RULES = {"norm": {"rms_norm_linearised"}, "interpolation": {"interpolate"}}


def _report_idle_options(paired: PairedGraph, options: StreamlineOptions) -> None:
    """Warn where attention=, norm= or interpolation= was set away from its default but no op of the graph it
    covers carries covariance, so the choice changes nothing (e.g. norm="linearised" on a model without layer
    norms), and where output_cov="diag" meets diagonal activations."""
    if options.rule_options.get("output_cov") == "diag" and options.activation_cov == "diag":
        warnings.warn("output_cov='diag' has no effect with activation_cov='diag': the outputs carry variances "
                      "already", FxstreamWarning, stacklevel=2)
    graph = paired.graph_module.graph
    means = {node.name: node for node in graph.nodes}
    tags = [node.meta["fxstream"] for node in graph.nodes if node.meta.get("fxstream", {}).get("role") == "cov"]
    for name, targets in _OPTION_TARGETS.items():
        choice = options.rule_options.get(name, DEFAULT_RULE_OPTIONS[name])
        if choice == DEFAULT_RULE_OPTIONS[name]:
            continue
        rules = _OPTION_RULES.get(name, set())
        used = any(getattr(means.get(tag["of"]), "target", None) in targets or tag["rule"] in rules for tag in tags)
        if not used:
            ops = ", ".join(sorted(str(t).split(".")[1] for t in targets) + sorted(rules))
            warnings.warn(f"{name}='{choice}' has no effect: no op it covers ({ops}) receives an uncertain input "
                          "in this model", FxstreamWarning, stacklevel=2)


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

