"""Cost model against measurement: predicted vs measured peak working memory of the streamlined graph.

For each target (mlp, cnn, gpt2) and activation structure, every layer the
rules support is made Bayesian (diagonal posterior), and the rewritten graph is
run eagerly on real tensors at sizes well outside the interpolation grid
(batch 2-3, seq 2-5). Two measurements of the peak working memory:

- allocator: torch.profiler with ``profile_memory=True`` records every
  allocation and free of torch's CPU allocator; the peak of the running sum
  (``fxstream.planner.measure.profiler_peak``). This is the reference.
- ops: the live bytes of storages returned by ops, tracked by a
  TorchDispatchMode (``fxstream.planner.measure_peak``).

The predicted peak is the cost model's liveness walk at those sizes; the error
column is predicted vs allocator.

    .venv/bin/python benchmarks/bench_planner.py            # prints a GitHub markdown table
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

import fxstream
from fxstream.planner import Planner, measure_peak
from fxstream.planner.measure import profiler_peak
from fxstream.planner.plan import format_bytes
from fxstream.planner.targets import load

SIZES = {
    "mlp": [{"batch": 16}, {"batch": 256}],
    "cnn": [{"batch": 1}, {"batch": 8}, {"batch": 64}],
    "gpt2": [{"batch": 2, "seq": 16}, {"batch": 8, "seq": 64}],
}


def real_inputs(planner: Planner, sizes: dict) -> list:
    def make(placeholder, shape):
        if torch.is_floating_point(placeholder.tensor):
            return torch.randn(shape, dtype=placeholder.tensor.dtype)
        return torch.randint(0, 100, shape, dtype=placeholder.tensor.dtype)

    return planner.sym.graph_inputs(sizes, make)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    rows, formulas = [], []
    for name in args.targets:
        torch.manual_seed(0)
        target = load(name)
        posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in target.model.named_parameters()})
        planner = Planner(target.model, target.args, posterior, target.dims)
        for structure in planner.structures:
            layers = planner.richest(structure)
            report = planner.report(layers, structure)
            paired = planner.paired(layers, structure)
            for sizes in SIZES[name]:
                if structure == "full" and report.peak_at(sizes) > 2**31:
                    continue
                predicted = report.peak_at(sizes)
                inputs = real_inputs(planner, sizes)
                start = time.perf_counter()
                by_ops = measure_peak(paired.graph_module, *inputs)
                seconds = time.perf_counter() - start
                by_allocator = profiler_peak(paired.graph_module, *inputs)
                rows.append([name, structure, len(layers), ", ".join(f"{k}={v}" for k, v in sizes.items()),
                             format_bytes(predicted), format_bytes(by_allocator), format_bytes(by_ops),
                             f"{100 * (predicted / by_allocator - 1):+.1f}%", f"{seconds:.2f}"])
            formulas.append([name, structure, str(report.peak_bytes)])
    print(tabulate(rows, headers=["target", "activations", "Bayesian layers", "sizes", "predicted peak",
                                  "measured (allocator)", "measured (ops)", "error", "run s"], tablefmt="github"))
    print()
    print(tabulate(formulas, headers=["target", "activations", "predicted peak working memory (bytes)"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
