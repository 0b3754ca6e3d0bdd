"""Timing shared by the benchmarks and `fxstream demo`: interleaved rounds, a choice of clock, medians.

Each round runs every function once, in turn, so that a change in machine load
hits all of them alike and the ratios between them (what the docs quote) stay
meaningful on a noisy machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = ("wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
              "(with --threads 1 it is the single-core run time)")


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, clock: str = "wall",
                   warmup: int = 2, synchronize: Callable[[], None] = lambda: None,
                   threads: int | None = None) -> dict[str, float]:
    """Median time of each function on ``clock`` over ``repeats`` rounds, after ``warmup`` untimed rounds.

    ``synchronize`` ends every call (``torch.cuda.synchronize`` on a GPU). ``threads``: torch's
    intra-op threads while timing (restored after; None leaves them).
    """
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {key: [] for key in fns}
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for round_ in range(warmup + repeats):
            for key, fn in fns.items():
                start = now()
                fn()
                synchronize()
                if round_ >= warmup:
                    times[key].append(now() - start)
    finally:
        torch.set_num_threads(before)
    return {key: statistics.median(values) for key, values in times.items()}
