"""fxstream: sampling-free predictive for Bayesian neural networks as a torch.compile pass."""

from ._compat import make_torchvision_importable

make_torchvision_importable()  # before anything (transformers, laplace-torch) imports torchvision

from .api import StreamlinedModel, streamline
from .backend import StreamlineOptions, predictive, streamline_backend
from .errors import (
    CaptureError,
    FxstreamError,
    FxstreamWarning,
    GraphBreakError,
    NoPredictiveError,
    PassError,
    PosteriorMismatchError,
    UnsupportedOpError,
)
from .importers import from_ivon, from_laplace
from . import metrics, pipeline, plot
from .planner import BudgetError, Plan, plan
from .posterior import KFAC, Dense, Diagonal, LowRank, Mixed, ParameterCovariance, Posterior, load_posterior
from .prediction import predict
from .predictive import Predictive
from .select import last_blocks, select
from .tuning import TuneResult, tune

__all__ = [
    "BudgetError",
    "Plan",
    "plan",
    "CaptureError",
    "Dense",
    "Diagonal",
    "KFAC",
    "LowRank",
    "Mixed",
    "ParameterCovariance",
    "FxstreamError",
    "FxstreamWarning",
    "GraphBreakError",
    "NoPredictiveError",
    "PassError",
    "Posterior",
    "PosteriorMismatchError",
    "Predictive",
    "StreamlineOptions",
    "StreamlinedModel",
    "TuneResult",
    "UnsupportedOpError",
    "from_ivon",
    "from_laplace",
    "last_blocks",
    "load_posterior",
    "metrics",
    "plot",
    "predict",
    "predictive",
    "select",
    "streamline",
    "streamline_backend",
    "tune",
]
__version__ = "0.1.0"
