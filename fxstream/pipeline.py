"""The pipeline after capture: decompose -> pair -> prune, then lower, one function for every caller.

The backend, the planner and ``fxstream inspect`` all rewrite a captured graph
through :func:`rewrite`, so the graph planned or shown is the graph that runs;
the backend then hands the pruned graph to :func:`lower`, which traces it once
to plain ATen (the planner runs the pruned graph itself, where every covariance
node still names its rule).
Each pass runs under its contract (what it requires of its input, what it
ensures of its output); a failure that is not one of fxstream's own errors is
reported as a :class:`PassError` naming the pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import FxstreamError, FxstreamWarning, PassError, PosteriorMismatchError
from .passes import CapturedGraph, PairedGraph, PruneReport, Source, lower_to_aten, pair, prune
from .passes.decompose import decompose
from .passes.lower import is_plain_aten
from .passes.pair import ROLE
from .rules.registry import covariance_dtype

if TYPE_CHECKING:
    from .backend import StreamlineOptions


@dataclass
class Rewritten:
    """What the pipeline made of one captured graph."""

    paired: PairedGraph
    report: PruneReport
    decomposed: int


def rewrite(captured: CapturedGraph, options: StreamlineOptions, structure: str | None = None) -> Rewritten:
    """decompose -> pair -> prune on ``captured`` under ``options`` (``structure`` overrides activation_cov)."""
    sources = _sources(captured, options)
    structure = structure or options.activation_cov
    decomposed = _run("decompose", lambda: decompose(captured, sources), requires=lambda: _functional(captured),
                      ensures=lambda _: _functional(captured))
    paired = _run("pair", lambda: pair(captured, sources, structure, options.outputs, options.rule_options))
    report = _run("prune", lambda: prune(paired), ensures=lambda _: paired.graph_module.graph.lint())
    return Rewritten(paired, report, decomposed)


def lower(paired: PairedGraph) -> torch.fx.GraphModule:
    """lower on a pruned graph: the same placeholders and outputs, computed by ATen ops alone."""
    return _run("lower", lambda: lower_to_aten(paired.graph_module), requires=lambda: _pruned(paired),
                ensures=lambda lowered: _plain_aten(lowered, paired))


def _run(name: str, call: Callable[[], Any], requires: Callable[[], None] | None = None,
         ensures: Callable[[Any], None] | None = None) -> Any:
    try:
        if requires is not None:
            requires()
        result = call()
        if ensures is not None:
            ensures(result)
        return result
    except FxstreamError:
        raise
    except Exception as error:
        raise PassError(name, error) from error


def _functional(captured: CapturedGraph) -> None:
    """Capture and decompose hand over a functional graph: no op that writes into its arguments."""
    for node in captured.graph_module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            raise FxstreamError(f"the graph holds the in-place op {node.target} ({node.name}); the passes need "
                                "functional ops, so this is a bug in fxstream: please report it with the model")


def _pruned(paired: PairedGraph) -> None:
    """Lowering takes a pruned graph: no marker of an op without a rule is left to trace."""
    for node in paired.graph_module.graph.nodes:
        if node.meta.get(ROLE, {}).get("rule") == "unsupported":
            raise FxstreamError(f"lower was handed an unpruned graph: {node.name} marks an op without a rule")


def _plain_aten(lowered: torch.fx.GraphModule, paired: PairedGraph) -> None:
    """Lowering leaves ATen ops only, with the pruned graph's inputs and outputs."""
    rule_code = [node.name for node in lowered.graph.nodes if not is_plain_aten(node)]
    if rule_code:
        raise FxstreamError(f"lower left calls that are not ATen ops: {rule_code[:5]}")
    count = lambda gm: len(gm.graph.find_nodes(op="placeholder"))  # noqa: E731
    outputs = lambda gm: len(gm.graph.find_nodes(op="output")[0].args[0])  # noqa: E731
    if (count(lowered), outputs(lowered)) != (count(paired.graph_module), outputs(paired.graph_module)):
        raise FxstreamError("lower changed the graph's inputs or outputs")


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
        lost: dict[str, int] = {}
        for placeholder_name, name in by_name.items():
            if name in wanted:
                cov = posterior.covariance(name)
                sources[placeholder_name] = Source(cov.kind, placed(name, cov.tensors, tensors[name], lost))
        warn_lost(lost, {covariance_dtype(tensors[name].dtype) for name in lost})
    given = options.input_var if options.input_var is not None else options.input_cov
    if given is not None:
        inputs = [p for p in captured.inputs() if torch.is_floating_point(p.tensor)]
        if not inputs:
            raise FxstreamError("input_var / input_cov given, but the model has no floating-point input")
        first = inputs[0]
        buffer = torch.as_tensor(given, dtype=covariance_dtype(first.tensor.dtype), device=first.tensor.device)
        _check_input_uncertainty(buffer, first.tensor, diagonal=options.input_var is not None)
        sources[first.name] = Source("diag" if options.input_var is not None else "full", (buffer,))
    return sources


def placed(name: str, tensors: tuple[torch.Tensor, ...], param: torch.Tensor,
            lost: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """A parameter's covariance tensors moved to its device and cast to its dtype, where the rules run.

    Moving is what a user wants (a posterior loads on the CPU; the model may sit on a GPU) and a
    cast to the model's precision is how the rules compute (float32 for a float16 model, see
    :func:`fxstream.rules.registry.covariance_dtype`). A cast that loses the covariance is
    not silent: entries beyond the dtype's range raise, naming the parameter, and nonzero entries
    that round to zero (a float64 posterior's 1e-50 in float32) are counted in ``lost`` per
    parameter for one warning. A meta tensor (no values) on either side is rejected.
    """
    if param.device.type == "meta":
        raise PosteriorMismatchError(f"parameter '{name}' of the model is on the meta device (it has no values); "
                                     "load the model's weights (e.g. model.to_empty(...) and load_state_dict) first")
    moved = []
    for tensor in tensors:
        if tensor.device.type == "meta":
            raise PosteriorMismatchError(
                f"the posterior's covariance of parameter '{name}' is on the meta device (it has no values); "
                f"build or load it with its values, e.g. fxstream.load_posterior(path, device='{param.device}')")
        cast = tensor.to(dtype=covariance_dtype(param.dtype), device=param.device)
        if cast.dtype != tensor.dtype and tensor.is_floating_point():
            back = cast.to(tensor.device)
            if not torch.isfinite(back).all():
                raise PosteriorMismatchError(
                    f"the posterior's covariance of parameter '{name}' overflows {cast.dtype}, the dtype the "
                    f"model's covariances are computed in (largest magnitude {tensor.abs().max().item():.3g}); "
                    "rescale it or run the model in a wider dtype")
            lost[name] = lost.get(name, 0) + int(((back == 0) & (tensor != 0)).sum())
        moved.append(cast)
    return tuple(moved)


def warn_lost(lost: dict[str, int], dtypes: set[torch.dtype]) -> None:
    """One warning for the covariance entries that rounded to zero in the model's dtype (see :func:`placed`)."""
    lost = {name: count for name, count in lost.items() if count}
    if lost:
        worst = ", ".join(f"'{n}' ({lost[n]})" for n in sorted(lost, key=lost.get, reverse=True)[:3])
        warnings.warn(
            f"{sum(lost.values())} nonzero covariance entries of {len(lost)} parameter(s) round to zero in "
            f"{', '.join(sorted(map(str, dtypes)))}, the dtype the model's covariances are computed in, and are "
            f"dropped (most in {worst}); run the model in a wider dtype if they matter",
            FxstreamWarning, stacklevel=3)


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


