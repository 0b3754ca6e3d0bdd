"""The pipeline: capture -> pair -> prune -> lower, one job per pass."""

from .capture import CapturedGraph, capture
from .lower import lower
from .pair import PairedGraph, Source, pair
from .prune import PruneReport, prune

__all__ = ["CapturedGraph", "PairedGraph", "PruneReport", "Source", "capture", "lower", "pair", "prune"]
