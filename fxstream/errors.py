"""Exceptions raised by fxstream; every message says what went wrong and what to do."""

from __future__ import annotations


class FxstreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class FxstreamWarning(UserWarning):
    """Something given to fxstream has no effect, or a plan leaves a requested layer deterministic."""


class UnsupportedOpError(FxstreamError):
    """Ops receive an uncertain input but fxstream has no rule for them (nor a decomposition into ruled ops).

    ``unsupported`` lists every such op as (op, module path, why), in graph order; ``op`` and
    ``module_path`` are the first one's.
    """

    def __init__(self, unsupported: list[tuple[str, str, str]]) -> None:
        self.unsupported = list(dict.fromkeys(unsupported))
        self.op, self.module_path, _ = self.unsupported[0]
        lines = []
        for op, module_path, detail in self.unsupported:
            where = f" in {module_path}" if module_path else ""
            extra = f": {detail}" if detail else ": no rule, and PyTorch has no decomposition into ops with rules"
            lines.append(f"  - '{op}'{where}{extra}")
        noun = "op has" if len(self.unsupported) == 1 else f"{len(self.unsupported)} ops have"
        super().__init__(
            f"an uncertain input reaches ops fxstream cannot pair with a covariance ({noun} no covariance rule "
            "for this call):\n" + "\n".join(lines) + "\nEither make the parameters upstream of them deterministic "
            "(leave them out of the posterior), or file the op with fxstream so a rule can be added."
        )


class PosteriorMismatchError(FxstreamError):
    """The posterior names a parameter the model lacks, or has the wrong shape or values."""


class GraphBreakError(FxstreamError):
    """The model cannot be captured as one graph, so covariance cannot flow through it."""


class CaptureError(FxstreamError):
    """The model could not be traced into a graph fxstream can rewrite."""


class NoPredictiveError(FxstreamError):
    """fxstream.predictive() was given a tensor that no streamlined call produced."""


class PassError(FxstreamError):
    """A pass of the pipeline failed for a reason of its own: a bug to report, with the pass named."""

    def __init__(self, pass_name: str, error: Exception) -> None:
        self.pass_name = pass_name
        super().__init__(
            f"fxstream's '{pass_name}' pass failed: {type(error).__name__}: {error}. This is a bug in fxstream; "
            "please report it with the model (or a small module that shows it)."
        )
