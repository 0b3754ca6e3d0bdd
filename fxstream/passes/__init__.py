"""The pipeline: capture -> pair -> prune -> lower, one job per pass."""

from .capture import CapturedGraph, capture
from .lower import compile_graph, lower_to_aten
from .pair import PairedGraph, Source, pair
from .prune import PruneReport, prune

__all__ = ["CapturedGraph", "PairedGraph", "PruneReport", "Source", "capture", "compile_graph", "lower_to_aten", "pair",
           "prune"]
