"""``fxstream.tune``: fit the prior precision, a variance scale and the observation noise on validation data.

Every candidate posterior is copied into the streamlined model's buffers (``set_posterior``: no new
capture, no new compile) and costs exactly one streamlined pass over the validation loader; nothing
that depends on the candidate is cached. For regression, each pass is scored under every value of the
noise grid from its means and variances, so the noise costs no pass. ``objective="marglik"`` scores
laplace-torch's log marginal likelihood instead (no pass at all).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from tabulate import tabulate
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader an extra time

from .api import StreamlinedModel
from .errors import FxstreamError, FxstreamWarning
from .posterior import PerParameter, Posterior
from .prediction import Batch, predict

logger = logging.getLogger("fxstream")

#: The default prior precision grid: 20 values, log-spaced over 10^-4 .. 10^4.
PRIOR_GRID = tuple(torch.logspace(-4, 4, 20, dtype=torch.float64).tolist())
#: The default variance-scale grid: 0 (the MAP network), then 19 values log-spaced over 10^-3 .. 10^2.
SCALE_GRID = (0.0, *torch.logspace(-3, 2, 19, dtype=torch.float64).tolist())


@dataclass
class TuneResult:
    """What :func:`tune` chose (also applied to the model), and every candidate it scored.

    ``prior_precision`` / ``scale``: a number, or a mapping from layer (module path) to number with
    ``per_layer=True``; None where not tuned. ``score``: the chosen candidate's validation NLPD, or
    its negative log marginal likelihood. ``at_edge`` names every choice at an end of its grid.
    """

    prior_precision: PerParameter | None
    scale: PerParameter | None
    sigma_noise: float | None
    objective: str
    score: float
    posterior: Posterior = field(repr=False)
    candidates: list[tuple[dict, float]] = field(repr=False, default_factory=list)
    passes: int = 0
    at_edge: list[str] = field(default_factory=list)

    @property
    def table(self) -> str:
        """Markdown: every candidate's settings and its score, the chosen one marked."""
        label = "validation NLPD" if self.objective == "nlpd" else "-log marginal likelihood"
        keys = list(dict.fromkeys(k for settings, _ in self.candidates for k in settings))
        best = min(range(len(self.candidates)), key=lambda i: self.candidates[i][1])
        rows = [[_show(settings.get(k)) for k in keys] + [f"{score:.6g}", "<-" if i == best else ""]
                for i, (settings, score) in enumerate(self.candidates)]
        return tabulate(rows, headers=[*keys, label, "chosen"], tablefmt="github")

    def __str__(self) -> str:
        chosen = ", ".join(f"{name}={_show(value)}" for name, value in
                           (("prior_precision", self.prior_precision), ("scale", self.scale),
                            ("sigma_noise", self.sigma_noise)) if value is not None)
        edge = f"; at the edge of its grid: {', '.join(self.at_edge)}" if self.at_edge else ""
        return (f"tuned {chosen} by {self.objective} ({self.score:.6g}) over {len(self.candidates)} candidates, "
                f"{self.passes} validation passes{edge}")


def _show(value) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k or '<top>'}: {v:.3g}" for k, v in value.items()) + "}"
    return f"{value:.4g}"


def tune(
    model: StreamlinedModel,
    val_loader: Iterable[Batch],
    *,
    prior_precision: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
    sigma_noise: Sequence[float] | None = None,
    per_layer: bool = False,
    objective: Literal["nlpd", "marglik"] = "nlpd",
    progress: bool = True,
) -> TuneResult:
    """Choose the prior precision and/or variance scale (and the regression noise) of a streamlined model.

    Args:
        model: from :func:`fxstream.streamline` with a weight posterior and a likelihood. Tuning starts
            from its current posterior (``model.posterior``): a scale multiplies that posterior's.
        val_loader: validation data, batches ``(x, y)`` (never the test set). Under torch.distributed
            it is sharded across ranks like :func:`fxstream.predict`, and every rank chooses alike.
        prior_precision: a grid; None: the default 20-value grid (10^-4 .. 10^4) when no scale grid is
            given and the posterior keeps its precision form (``fxstream.from_laplace``).
        scale: a grid of variance scales (0: the MAP network); None: not tuned, or the default
            20-value grid (0, then 10^-3 .. 10^2) when the posterior has no precision form.
        sigma_noise: regression only, a grid of observation noise stds scored from each pass's
            means and variances (free); None keeps the model's ``sigma_noise``. The posterior's
            Hessian keeps the noise it was fitted with.
        per_layer: after the global search, one coordinate sweep over the layers (module paths):
            each layer's value in turn over the same grid, the others held.
        objective: "nlpd" (validation negative log predictive density: probit predictive for
            classification, Gaussian with the noise for regression) or "marglik" (laplace-torch's
            log marginal likelihood of the prior and noise, for posteriors from ``from_laplace``;
            no validation pass; ``val_loader`` is unused).
        progress: a progress bar over candidates.

    The choice is applied to ``model`` (``set_posterior``, and its ``sigma_noise``) and logged; a choice
    at an end of its grid warns (:class:`FxstreamWarning`) and is listed in ``result.at_edge``.
    """
    posterior = model.posterior
    likelihood = model.options.likelihood
    if posterior is None:
        raise FxstreamError("tune needs a model streamlined with a weight posterior")
    if objective not in ("nlpd", "marglik"):
        raise FxstreamError(f"objective must be 'nlpd' or 'marglik', got {objective!r}")
    if objective == "nlpd" and likelihood not in ("classification", "regression"):
        raise FxstreamError("tune by NLPD needs a likelihood: streamline(..., likelihood='classification' or "
                            "'regression')")
    if likelihood != "regression" and sigma_noise is not None:
        raise FxstreamError("sigma_noise is the observation noise of regression; this model's likelihood is "
                            f"{likelihood!r}")
    if prior_precision is None and scale is None:
        if posterior.has_precision_form:
            prior_precision = PRIOR_GRID
        elif objective == "nlpd":
            scale = SCALE_GRID
    if prior_precision is not None and not posterior.has_precision_form:
        posterior.with_prior_precision(1.0)  # raises the error that says why and what to do instead
    grids = {"prior_precision": _grid(prior_precision, "prior_precision", positive=True),
             "scale": _grid(scale, "scale", positive=False)}
    grids = {name: grid for name, grid in grids.items() if grid is not None}
    noise = _grid(sigma_noise, "sigma_noise", positive=True) or [model.options.sigma_noise]
    if likelihood == "regression" and noise == [None] and objective == "nlpd":
        raise FxstreamError("regression NLPD needs an observation noise: streamline(..., sigma_noise=...) or "
                            "tune(..., sigma_noise=[grid])")
    if objective == "marglik":
        if posterior._marglik is None:
            raise FxstreamError("objective='marglik' needs a posterior from fxstream.from_laplace(la) (it asks "
                                "laplace-torch for the marginal likelihood); use objective='nlpd'")
        if "scale" in grids:
            raise FxstreamError("the marginal likelihood scores a prior precision (and noise), not a variance scale; "
                                "use objective='nlpd' to tune a scale")
    search = _Search(model, posterior, val_loader, objective, noise, progress)
    layers = list(posterior.groups()) if per_layer else []
    total = math.prod(len(g) for g in grids.values()) + len(layers) * sum(len(g) for g in grids.values())
    with tqdm(total=total, desc="fxstream.tune", disable=not progress) as bar:
        search.bar = bar
        best = min((search.score(dict(zip(grids, values))) for values in _product(list(grids.values()))),
                   key=lambda scored: scored[0])
        if layers:
            best = (best[0], {name: dict.fromkeys(layers, value) for name, value in best[1].items()}, best[2])
        for layer in layers:
            for name, grid in grids.items():
                current = best[1]
                tried = [search.score({**current, name: {**current[name], layer: value}}) for value in grid]
                best = min([best, *tried], key=lambda scored: scored[0])
    score, settings, sigma = best
    chosen = search.posterior(settings)
    model.set_posterior(chosen)
    if likelihood == "regression":
        model.options.sigma_noise = sigma
    result = TuneResult(settings.get("prior_precision"), settings.get("scale"), sigma, objective, score, chosen,
                        search.candidates, search.passes, _edges(settings, grids, sigma, noise))
    for where in result.at_edge:
        warnings.warn(f"tune chose {where}, an end of its grid: the best value may lie outside it; widen the grid",
                      FxstreamWarning, stacklevel=2)
    logger.info("fxstream.tune: %s", result)
    return result


def _grid(values: Sequence[float] | None, name: str, positive: bool) -> list[float] | None:
    if values is None:
        return None
    grid = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if not grid or any(not math.isfinite(v) or v < 0 or (positive and v == 0) for v in grid):
        bound = "> 0" if positive else ">= 0"
        raise FxstreamError(f"the {name} grid must be a non-empty sequence of finite numbers {bound}, got {values!r}")
    return sorted(set(grid))


def _product(grids: list[list[float]]) -> list[tuple[float, ...]]:
    combos: list[tuple[float, ...]] = [()]
    for grid in grids:
        combos = [(*c, v) for c in combos for v in grid]
    return combos


def _edges(settings: dict, grids: dict[str, list[float]], sigma: float | None, noise: list) -> list[str]:
    """Every chosen value that sits at an end of a grid of two or more values."""
    found = []
    for name, grid in grids.items():
        chosen = settings[name]
        values = chosen.items() if isinstance(chosen, Mapping) else [(None, chosen)]
        for layer, value in values:
            if len(grid) > 1 and value in (grid[0], grid[-1]):
                found.append(f"{name}{'' if layer is None else f'[{layer!r}]'}={value:.4g}")
    if len(noise) > 1 and sigma in (noise[0], noise[-1]):
        found.append(f"sigma_noise={sigma:.4g}")
    return found


class _Search:
    """Scores candidates: one streamlined pass each (NLPD), or laplace-torch's marginal likelihood."""

    def __init__(self, model: StreamlinedModel, base: Posterior, loader: Iterable[Batch], objective: str,
                 noise: list, progress: bool) -> None:
        self.model, self.base, self.loader, self.objective, self.noise = model, base, loader, objective, noise
        self.progress = progress
        self.candidates: list[tuple[dict, float]] = []
        self.passes = 0
        self.bar = None

    def posterior(self, settings: dict) -> Posterior:
        posterior = self.base
        if "prior_precision" in settings:
            posterior = posterior.with_prior_precision(settings["prior_precision"])
        if "scale" in settings:
            posterior = posterior.scaled(settings["scale"])
        return posterior

    def score(self, settings: dict) -> tuple[float, dict, float | None]:
        """(score, settings, best noise) of one candidate; lower is better."""
        if self.objective == "marglik":
            prior = settings.get("prior_precision", self.base.prior_precision)
            scores = [(-self.base._marglik(prior, sigma), sigma) for sigma in self.noise]
        else:
            self.model.set_posterior(self.posterior(settings))
            pred, targets = predict(self.model, self.loader, progress=False)
            self.passes += 1
            if targets is None:
                raise FxstreamError("the validation loader yields no targets: batches must be (x, y)")
            if pred.likelihood == "regression":
                scores = [(float(replace(pred, sigma_noise=sigma).nlpd(targets)), sigma) for sigma in self.noise]
            else:
                scores = [(float(pred.nlpd(targets.to(pred.mean.device))), None)]
        score, sigma = min(scores, key=lambda s: s[0])
        for s, noise in scores:
            self.candidates.append(({**settings, "sigma_noise": noise} if noise is not None else dict(settings), s))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"best so far {min(c[1] for c in self.candidates):.4g}")
        return score, settings, sigma
