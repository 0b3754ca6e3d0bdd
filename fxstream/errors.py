"""Exceptions raised by fxstream; every message says what went wrong and what to do."""

from __future__ import annotations


class FxstreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class UnsupportedOpError(FxstreamError):
    """An op receives an uncertain input but fxstream has no rule for it."""

    def __init__(self, op: str, module_path: str, detail: str = "") -> None:
        self.op = op
        self.module_path = module_path
        where = f" in {module_path}" if module_path else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"no covariance rule for op '{op}'{where}{extra}, and an uncertain input reaches it. "
            "Either make the parameters upstream of it deterministic (leave them out of the "
            "posterior), or file the op with fxstream so a rule can be added."
        )


class PosteriorMismatchError(FxstreamError):
    """The posterior names a parameter the model lacks, or has the wrong shape or values."""


class GraphBreakError(FxstreamError):
    """The model cannot be captured as one graph, so covariance cannot flow through it."""


class CaptureError(FxstreamError):
    """The model could not be traced into a graph fxstream can rewrite."""


class NoPredictiveError(FxstreamError):
    """fxstream.predictive() was given a tensor that no streamlined call produced."""
