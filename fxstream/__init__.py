"""fxstream: sampling-free predictive for Bayesian neural networks as a torch.compile pass."""

from .api import StreamlinedModel, streamline
from .backend import StreamlineOptions, predictive, streamline_backend
from .errors import (
    CaptureError,
    FxstreamError,
    GraphBreakError,
    NoPredictiveError,
    PosteriorMismatchError,
    UnsupportedOpError,
)
from .posterior import Diagonal, Posterior
from .predictive import Predictive

__all__ = [
    "CaptureError",
    "Diagonal",
    "FxstreamError",
    "GraphBreakError",
    "NoPredictiveError",
    "Posterior",
    "PosteriorMismatchError",
    "Predictive",
    "StreamlineOptions",
    "StreamlinedModel",
    "UnsupportedOpError",
    "predictive",
    "streamline",
    "streamline_backend",
]
__version__ = "0.1.0"
