"""The memory-budget planner: which layers are Bayesian, and in which structure, within a budget.

A *layer* is a module owning parameters of the posterior. A plan gives every
layer a weight structure: "none" (deterministic), "diag" (the posterior's
exact marginal variances), or the posterior's own richer structure where it
has one ("kfac", "kfac_eig", "dense", "lowrank", ...); and the whole graph one
activation covariance ("diag" or "full").

Fidelity is measured on a calibration batch (the example input): every plan
the search takes is run (eager, at the example's sizes) and its output
variance compared with that of the richest affordable reference:
every layer in its richest structure, "full" activations when that fits ``reference_budget``,
else "diag". The measure is one minus the mean relative variance error,

    fidelity = 1 - mean_i |v_plan,i - v_ref,i| / v_ref,i      (clipped to [0, 1]),

over the output elements with v_ref > 0: 1 reproduces the reference, 0 is a
deterministic network. Results are cached per (choice, structure).

Search: for each activation structure a greedy chain starts from no Bayesian
layer and repeatedly takes the upgrade (a layer turned on, or moved to a
richer weight structure) with the best fidelity gain per byte of total memory
at the requested sizes, while the gain is positive. Candidates are ranked by
estimates: the gain from the current plan's variance plus the layer's own
(measured alone during calibration; variances add to first order, the
product of two layers' variances is what they miss), the bytes with the
workspaces already profiled (unseen ones estimated by their output bytes).
The step taken is then run and costed exactly, and kept only if its measured
fidelity rises. A budget takes
the longest prefix of a chain that fits, and the structure whose prefix has
the higher fidelity. The chain does not depend on the budget, so a larger
budget never gets a lower fidelity.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import sympy
import torch
from tqdm import tqdm

from ..backend import StreamlineOptions
from ..errors import FxstreamError, FxstreamWarning
from ..passes import PairedGraph
from ..pipeline import rewrite
from ..posterior import Diagonal, Posterior
from .cost import CostReport, Interpolator, cost_report
from .symbolic import Dims, SymbolicCapture, capture_symbolic

STRUCTURES = ("diag", "full")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(FxstreamError):
    """No plan fits the memory budget at the requested sizes.

    ``minimum_bytes``: the budget the cheapest plan needs at those sizes;
    ``largest_batch``: the largest batch whose cheapest plan fits the budget
    (0: none; None: the model has no batch size symbol).
    """

    def __init__(self, message: str, minimum_bytes: int | None = None, largest_batch: int | None = None) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.largest_batch = largest_batch


def parse_bytes(budget: int | float | str) -> int:
    """Bytes from an int or a string such as "2GiB", "512 MB", "1e9"."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = int(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(budget))
        if match is None or match.group(2).lower() not in _UNITS:
            raise FxstreamError(f"cannot read the budget '{budget}': use bytes or e.g. '2GiB', '512MB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise FxstreamError(f"the budget must be positive, got {budget}")
    return value


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class LayerRow:
    """One layer of a plan: its structure, why, and what it costs."""

    layer: str
    parameters: list[str]
    structure: str
    reason: str
    posterior_bytes: int
    gain: float = 0.0
    bytes: sympy.Expr = sympy.Integer(0)
    flops: sympy.Expr = sympy.Integer(0)


@dataclass
class Plan:
    """A chosen plan: per-layer rows, the activation structure, totals and formulas.

    ``limits``: per size, the largest value (the others as planned) that fits the
    budget and the model (a transformers model's position table caps ``seq``);
    None when no budget bound exists.
    """

    activation_cov: str
    layers: list[LayerRow]
    sizes: dict[str, int]
    budget: int
    fidelity: float
    report: CostReport = field(repr=False)
    posterior: Posterior = field(repr=False)
    limits: dict[str, int | None] = field(default_factory=dict)
    reference: str = ""

    @property
    def total_bytes(self) -> sympy.Expr:
        return self.report.total_bytes

    @property
    def flops(self) -> sympy.Expr:
        return self.report.flops

    def total_at(self, sizes: Mapping[str, int] | None = None) -> int:
        return self.report.total_at({**self.sizes, **(sizes or {})})

    def to_dict(self) -> dict:
        sizes = self.sizes
        return {
            "activation_cov": self.activation_cov,
            "sizes": sizes,
            "budget": self.budget,
            "fidelity": self.fidelity,
            "reference": self.reference,
            "total_bytes": self.total_at(),
            "total_bytes_formula": str(self.total_bytes),
            "static_bytes_formula": str(self.report.static_bytes),
            "peak_bytes_formula": str(self.report.peak_bytes),
            "flops": self.report.evaluate(self.flops, sizes),
            "flops_formula": str(self.flops),
            "deterministic_flops": self.report.evaluate(self.report.deterministic_flops, sizes),
            "limits": self.limits,
            "layers": [
                {"layer": r.layer, "structure": r.structure, "reason": r.reason, "parameters": r.parameters,
                 "posterior_bytes": r.posterior_bytes, "fidelity_gain": r.gain,
                 "cov_bytes": self.report.evaluate(r.bytes, sizes), "cov_bytes_formula": str(r.bytes),
                 "flops": self.report.evaluate(r.flops, sizes), "flops_formula": str(r.flops)}
                for r in self.layers
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _flop_ratio(self) -> str:
        """FLOPs over the deterministic forward's: where matrix products dominate, the least slowdown to expect."""
        deterministic = self.report.evaluate(self.report.deterministic_flops, self.sizes)
        if not deterministic:
            return "-"
        return f"{self.report.evaluate(self.flops, self.sizes) / deterministic:.2f}x (deterministic {deterministic:.4g})"

    def table(self) -> str:
        """A text report: one row per layer, then totals and limits."""
        from tabulate import tabulate

        sizes = self.sizes
        rows = [[r.layer, r.structure, r.reason, f"{r.gain:+.3f}", format_bytes(r.posterior_bytes),
                 format_bytes(self.report.evaluate(r.bytes, sizes)), str(r.bytes),
                 f"{self.report.evaluate(r.flops, sizes):.3g}", str(r.flops)] for r in self.layers]
        layers = tabulate(rows, headers=["layer", "structure", "why", "fidelity gain", "posterior",
                                         "cov bytes", "cov bytes formula", "cov FLOPs", "cov FLOPs formula"])
        limits = ", ".join(f"max {k} {v if v is not None else 'unbounded'}" for k, v in self.limits.items())
        totals = tabulate([
            ["activation covariance", self.activation_cov],
            ["sizes", ", ".join(f"{k}={v}" for k, v in sizes.items())],
            ["budget", format_bytes(self.budget)],
            ["total (static + peak)", f"{format_bytes(self.total_at())} = {self.total_bytes}"],
            ["FLOPs", f"{self.report.evaluate(self.flops, sizes):.4g} = {self.flops}"],
            ["FLOPs vs deterministic forward", self._flop_ratio()],
            ["fidelity (measured)", f"{self.fidelity:.3f} (1 - mean relative variance error vs {self.reference})"],
            ["limits (budget and model)", limits or "-"],
        ], tablefmt="plain")
        return f"{layers}\n\n{totals}"


Choice = frozenset
"""A plan's Bayesian layers: a frozenset of (layer, weight structure) pairs."""


class _Chosen(Posterior):
    """The posterior restricted to chosen layers, each in its own structure or as its diagonal."""

    def __init__(self, native: Posterior, diagonal: Diagonal, structures: dict[str, str]) -> None:
        self.native, self.diagonal, self.structures = native, diagonal, structures

    def parameter_names(self) -> list[str]:
        return list(self.structures)

    def covariance(self, name: str):
        source = self.diagonal if self.structures[name] == "diag" else self.native
        return source.covariance(name)

    def validate(self, parameters) -> None:
        self.native.validate(parameters)

    def __repr__(self) -> str:
        return f"Chosen({len(self.structures)} parameters of {self.native!r})"


class Planner:
    """Everything a plan needs, computed once per model: capture, calibration, cost cache.

    Each layer's weight structures, cheapest first: "diag" (the posterior's
    exact marginal variances) and, when the posterior is richer, its own
    structure ("kfac", "dense", "lowrank", ...).
    """

    def __init__(self, model: torch.nn.Module, args: tuple, posterior: Posterior, dims: Dims,
                 reference_budget: int = 2**30, progress: bool = False,
                 structures: tuple[str, ...] = STRUCTURES, rule_options: Mapping[str, str] | None = None,
                 output: str | int | None = None) -> None:
        if not isinstance(posterior, Posterior):
            raise FxstreamError(f"the planner needs an fxstream posterior, got {type(posterior).__name__}")
        posterior.validate(dict(model.named_parameters()))
        self.model, self.args, self.posterior = model, args, posterior
        self.rule_options = dict(rule_options or {})  # the graphs planned are the graphs that will run
        self.reference_budget = reference_budget
        self.diagonal = posterior if isinstance(posterior, Diagonal) else posterior.to_diagonal()
        self.progress = progress
        self.sym: SymbolicCapture = capture_symbolic(model, args, dims, output)
        self.interpolator = Interpolator(self.sym)
        self._reports: dict[tuple, CostReport] = {}
        self.layers = _group(posterior.parameter_names())
        self.ladders = {layer: self._ladder(params) for layer, params in self.layers.items()}
        self.unsupported: dict[str, str] = {}
        self.supported: set[tuple[str, str, str]] = set()
        self._variances: dict[tuple, torch.Tensor] = {}
        unknown = sorted(set(structures) - set(STRUCTURES))
        if unknown or not structures:
            raise FxstreamError(f"activation structures must be among {STRUCTURES}, got {list(structures)}")
        self.structures = [s for s in STRUCTURES if s in structures and self._calibrate(s)]
        if not self.structures:
            raise FxstreamError("no layer of the posterior can be made Bayesian: " + "; ".join(
                f"{layer}: {why}" for layer, why in self.unsupported.items()))
        self.reference, self.reference_var = self._reference()

    def _ladder(self, params: list[str]) -> list[str]:
        kinds = [self.posterior.covariance(p).kind.removeprefix("param_") for p in params]
        native = next((k for k in kinds if k not in ("diag", "affine_bias")), "diag")
        return ["diag"] if native == "diag" else ["diag", native]

    def subset(self, choice: Choice) -> Posterior:
        """The posterior of a plan: the chosen layers in their chosen structures."""
        structures = {p: weight for layer, weight in choice for p in self.layers[layer]}
        if all(w == "diag" for w in structures.values()):
            return Diagonal({p: self.diagonal.variances[p] for p in structures})
        return _Chosen(self.posterior, self.diagonal, structures)

    def paired(self, choice: Choice, structure: str) -> PairedGraph:
        options = StreamlineOptions(posterior=self.subset(choice), activation_cov=structure, model=self.model,
                                    rule_options=self.rule_options)
        return rewrite(self.sym.captured, options).paired

    def report(self, choice: Choice, structure: str, exact: bool = True) -> CostReport:
        """The cost report of a plan (cached); ``exact=False`` may estimate unseen workspaces."""
        key = (frozenset(choice), structure)
        cached = self._reports.get(key)
        if cached is None or (exact and not cached.exact):
            cached = cost_report(self.sym, self.paired(choice, structure), self.interpolator, exact)
            self._reports[key] = cached
        return cached

    def output_variance(self, choice: Choice, structure: str) -> torch.Tensor:
        """The plan's output variance on the calibration batch (cached)."""
        key = (frozenset(choice), structure)
        if key not in self._variances:
            self._variances[key] = self._run(choice, structure)
        return self._variances[key]

    def _run(self, choice: Choice, structure: str) -> torch.Tensor:
        paired = self.paired(choice, structure)
        inputs = self.sym.graph_inputs(self.sym.example_sizes, lambda p, shape: self._example(p))
        with torch.no_grad():
            outputs = paired.graph_module(*inputs)
        cov = outputs[paired.num_outputs]
        return cov.diagonal(dim1=-2, dim2=-1).reshape(-1) if paired.cov_kinds[0] == "full" else cov.reshape(-1)

    def _example(self, placeholder):
        """The calibration tensor of a model input placeholder: the example argument it was captured from."""
        for arg in self.sym.example_args:
            if arg is placeholder.tensor:
                return arg
        raise FxstreamError(f"graph input '{placeholder.name}' of shape {tuple(placeholder.tensor.shape)} is none of "
                            "the example inputs; capture classified it as a model input, but it is not one")

    def _calibrate(self, structure: str) -> bool:
        usable = False
        rungs = [(layer, weight) for layer, ladder in self.ladders.items() for weight in ladder]
        for layer, weight in tqdm(rungs, desc=f"calibrate {structure}", leave=False, disable=not self.progress):
            try:
                choice = frozenset({(layer, weight)})
                needed = self.report(choice, structure, exact=False).total_at(self.sym.example_sizes)
                if needed > self.reference_budget:
                    self.unsupported.setdefault(layer, f"{structure} activations need {format_bytes(needed)} on the "
                                                       "calibration batch; give a smaller example input")
                    continue
                self.output_variance(choice, structure)
                self.supported.add((layer, weight, structure))
                usable = True
            except FxstreamError as error:
                self.unsupported.setdefault(layer, str(error).split(". ")[0])
            except (ValueError, RuntimeError) as error:
                self.unsupported.setdefault(layer, f"{weight} weights, {structure} activations: "
                                                   f"{str(error).splitlines()[0]}")
        return usable

    def richest(self, structure: str) -> Choice:
        """Every layer in its richest structure that works with these activations."""
        choice = []
        for layer, ladder in self.ladders.items():
            usable = [w for w in ladder if (layer, w, structure) in self.supported]
            if usable:
                choice.append((layer, usable[-1]))
        return frozenset(choice)

    def _reference(self) -> tuple[str, torch.Tensor]:
        # Richer activations only where they cover as many layers: a "full" reference that leaves out
        # the layers "full" cannot afford would score every plan without them as perfect.
        covered = {s: len(self.richest(s)) for s in self.structures}
        for structure in reversed(self.structures):
            if covered[structure] < max(covered.values()):
                continue
            if self.report(self.richest(structure), structure).total_at(self.sym.example_sizes) <= self.reference_budget:
                return structure, self.output_variance(self.richest(structure), structure)
        structure = self.structures[0]
        return structure, self.output_variance(self.richest(structure), structure)

    def fidelity(self, choice: Choice, structure: str) -> float:
        """1 - mean relative variance error of the plan's measured output variance against the reference."""
        if not choice:
            return 0.0
        return _fidelity(self.output_variance(choice, structure), self.reference_var)

    def chain(self, structure: str, sizes: Mapping[str, int]) -> list[tuple[Choice, float, int]]:
        """Greedy upgrade chain: (choice, fidelity, total bytes) from one layer up to all useful upgrades.

        An upgrade turns a layer on, or moves it to a richer weight structure.
        Candidates are ranked by an estimate: the measured output variance of
        the current choice plus the upgrade's own contribution, measured alone
        during calibration (exact to first order, where each layer's variance
        adds). Only the chosen upgrade is run, and it is kept only when its
        measured fidelity rises, so the chain's fidelities are all measured
        and increasing: one run per step instead of one per candidate.
        """
        current: dict[str, str] = {}
        fidelity, total = 0.0, 0
        variance = torch.zeros_like(self.reference_var)
        refused: set[tuple[str, str]] = set()
        steps = []
        bar = tqdm(desc=f"plan {structure}", leave=False, disable=not self.progress)
        while True:
            best = None
            for layer, ladder in self.ladders.items():
                start = ladder.index(current[layer]) + 1 if layer in current else 0
                for weight in ladder[start:]:
                    if (layer, weight, structure) not in self.supported or (layer, weight) in refused:
                        continue
                    estimate = variance + self._alone(layer, weight, structure)
                    if layer in current:
                        estimate = estimate - self._alone(layer, current[layer], structure)
                    gain = _fidelity(estimate, self.reference_var) - fidelity
                    if gain <= 0:
                        continue
                    choice = frozenset({**current, layer: weight}.items())
                    cost = self.report(choice, structure, exact=False).total_at(sizes)
                    score = gain / max(cost - total, 1)
                    if best is None or score > best[0]:
                        best = (score, layer, weight, choice)
            if best is None:
                break
            _, layer, weight, choice = best
            measured = self.fidelity(choice, structure)
            if measured <= fidelity:
                refused.add((layer, weight))
                continue
            current[layer] = weight
            fidelity, variance = measured, self.output_variance(choice, structure)
            total = self.report(choice, structure).total_at(sizes)
            steps.append((choice, fidelity, total))
            bar.update(1)
        bar.close()
        return steps

    def _alone(self, layer: str, weight: str, structure: str) -> torch.Tensor:
        """The output variance with only ``layer`` Bayesian, in structure ``weight``."""
        return self.output_variance(frozenset({(layer, weight)}), structure)


def _fidelity(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """1 - mean |v - v_ref| / v_ref, clipped to [0, 1], computed per element as v / v_ref (under the
    reference) or 2 - v / v_ref (over it): the same number without cancellation, so a layer whose share of
    the reference is 1e-12 still shows a gain (with 1 - error it rounded to 0 and the planner found nothing)."""
    mask = reference > 0
    if not mask.any():
        return 0.0
    ratio = estimate[mask].double() / reference[mask].double()
    agreement = torch.where(ratio <= 1, ratio, 2 - ratio)
    return min(1.0, max(0.0, agreement.mean().item()))


def _group(names: list[str]) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return layers


def choose(planner: Planner, budget: int | str, sizes: Mapping[str, int] | None = None) -> Plan:
    """The best plan for ``budget`` at ``sizes`` (default: the example's sizes)."""
    budget = parse_bytes(budget)
    sizes = {**planner.sym.given_sizes, **(sizes or {})}
    unknown = sorted(set(sizes) - set(planner.sym.symbols))
    if unknown:
        raise FxstreamError(f"the model has no symbolic size {unknown}; it has {sorted(planner.sym.symbols)}")
    chains = {s: planner.chain(s, sizes) for s in planner.structures}
    best = None
    for structure, steps in chains.items():
        prefix = _longest_prefix(steps, budget)
        if prefix is None:
            continue
        choice, fidelity, total = steps[prefix]
        if best is None or (fidelity, -total) > (best[2], -best[3]):
            best = (structure, choice, fidelity, total)
    if best is None:
        raise _infeasible(planner, chains, budget, sizes)
    structure, choice, fidelity, _ = best
    report = planner.report(choice, structure)
    posterior = planner.subset(choice)
    rows = _rows(planner, choice, structure, report)
    plan = Plan(structure, rows, dict(sizes), budget, fidelity, report, posterior,
                limits=_limits(report, budget, sizes, model_bounds(planner.model)), reference=planner.reference)
    left = [row for row in rows if row.structure == "none"]
    if left:
        warnings.warn(f"the plan leaves {len(left)} of the posterior's {len(rows)} layers deterministic: "
                      + "; ".join(f"{row.layer} ({row.reason})" for row in left), FxstreamWarning, stacklevel=2)
    return plan


def _longest_prefix(steps, budget: int) -> int | None:
    """Index of the last step k such that steps 0..k all fit, so a larger budget never goes backwards."""
    last = None
    for i, (_, _, total) in enumerate(steps):
        if total > budget:
            break
        last = i
    return last


def _rows(planner: Planner, choice: Choice, structure: str, report: CostReport) -> list[LayerRow]:
    chosen = dict(choice)
    rows = []
    for layer, params in planner.layers.items():
        posterior_bytes = sum(t.numel() * t.element_size() for p in params
                              for t in planner.posterior.covariance(p).tensors)
        if layer in chosen:
            without = frozenset((k, v) for k, v in choice if k != layer)
            gain = planner.fidelity(choice, structure) - planner.fidelity(without, structure)
            mine = [n for n in report.nodes if n.role == "cov" and not n.static and n.module == layer]
            rows.append(LayerRow(layer, params, chosen[layer], "chosen", posterior_bytes, gain,
                                 sympy.Add(*(n.bytes for n in mine)), sympy.Add(*(n.flops for n in mine))))
        elif not any((layer, w, structure) in planner.supported for w in planner.ladders[layer]):
            why = planner.unsupported.get(layer, f"no '{structure}' rule on its path")
            rows.append(LayerRow(layer, params, "none", f"cannot: {why}", posterior_bytes))
        else:
            rows.append(LayerRow(layer, params, "none", "budget or no gain", posterior_bytes))
    return rows


def _limits(report: CostReport, budget: int, sizes: Mapping[str, int],
            bounds: Mapping[str, int]) -> dict[str, int | None]:
    """The largest value of each size (others as given) whose total still fits the budget and the model."""
    limits = {name: largest_fitting(report, budget, sizes, name) for name in report.symbols}
    for name, bound in bounds.items():
        if name in limits:
            limits[name] = bound if limits[name] is None else min(limits[name], bound)
    return limits


def model_bounds(model: torch.nn.Module) -> dict[str, int]:
    """Sizes the model itself caps: a transformers model's sequence at its position table."""
    config = getattr(model, "config", None)
    for field_name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field_name, None)
        if isinstance(value, int) and value > 0:
            return {"seq": value}
    return {}


def largest_fitting(report: CostReport, budget: int, sizes: Mapping[str, int], name: str,
                    ceiling: int = 2**40) -> int | None:
    """Binary search for the largest ``name`` with total bytes <= budget (0 if even 1 does not fit)."""
    def fits(value: int) -> bool:
        return report.total_at({**sizes, name: value}) <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > ceiling:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _infeasible(planner: Planner, chains, budget: int, sizes: Mapping[str, int]) -> BudgetError:
    firsts = [(steps[0][2], structure, steps[0][0]) for structure, steps in chains.items() if steps]
    if not firsts:
        return BudgetError("no layer adds output variance, so there is nothing to plan")
    minimum, structure, choice = min(firsts, key=lambda f: f[0])
    report = planner.report(choice, structure)
    batch = largest_fitting(report, budget, sizes, "batch") if "batch" in report.symbols else None
    at = ", ".join(f"{k}={v}" for k, v in sizes.items())
    if batch is None:
        hint = ""
    elif batch == 0:
        hint = "; no batch size fits this budget"
    else:
        hint = f"; at this budget the largest batch that fits is {batch}"
    return BudgetError(f"no plan fits {format_bytes(budget)} at {at}: the cheapest plan (layer "
                       f"{', '.join(f'{layer} {weight}' for layer, weight in sorted(choice))}, {structure} activations) needs {format_bytes(minimum)} "
                       f"({minimum} bytes){hint}", minimum, batch)


def plan(model: torch.nn.Module, example_args: tuple | torch.Tensor, posterior: Posterior, budget: int | str, *,
         sizes: Mapping[str, int] | None = None, dims: Dims | None = None,
         activation_cov: tuple[str, ...] = STRUCTURES, progress: bool = False,
         rule_options: Mapping[str, str] | None = None, output: str | int | None = None) -> Plan:
    """Choose per layer the structure that maximises fidelity within ``budget`` at ``sizes``.

    Args:
        model: the model in eval mode.
        example_args: an example call ``model(*example_args)``; also the calibration batch.
        posterior: the full posterior to choose from (any fxstream posterior; each layer may also
            fall back to its diagonal, i.e. its exact marginal variances).
        budget: bytes, or a string such as "2GiB".
        sizes: the sizes to plan for, e.g. ``{"batch": 32, "seq": 512}`` (default: the example's).
        dims: which input dimensions are which size (default: dim 0 of the first input is "batch").
        activation_cov: the activation structures to consider ("diag", "full").
        progress: show progress bars.
        rule_options: the rule options the plan will run with (``attention=``, ``norm=``,
            ``residual=``, ... of :func:`fxstream.streamline`): they change the graph and its memory.
        output: the output to plan the predictive of, as :func:`fxstream.streamline`'s ``output=``
            (default: "logits" if present, else the first tensor).
    """
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    planner = Planner(model, args, posterior, dims or {(0, 0): "batch"}, progress=progress,
                      structures=activation_cov, rule_options=rule_options, output=output)
    return choose(planner, budget, sizes)
