"""The benchmarks' timing helpers live in the package (``fxstream demo`` times its methods the same way)."""

from fxstream.timing import CLOCK_HELP, CLOCKS, median_seconds

__all__ = ["CLOCK_HELP", "CLOCKS", "median_seconds"]
