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
column is predicted vs allocator. With ``--device cuda`` the model is
captured and profiled on the GPU and the allocator column is
``torch.cuda.max_memory_allocated`` during the call minus the memory allocated
before it (after one warm-up call, so library workspaces that persist are not counted).

    .venv/bin/python benchmarks/bench_planner.py            # prints a GitHub markdown table
    python benchmarks/bench_planner.py --device cuda        # the same against the CUDA allocator
"""

from __future__ import annotations

import argparse
import sys
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
        like = {"dtype": placeholder.tensor.dtype, "device": placeholder.tensor.device}
        if torch.is_floating_point(placeholder.tensor):
            return torch.randn(shape, **like)
        return torch.randint(0, 100, shape, **like)

    return planner.sym.graph_inputs(sizes, make)


def cuda_peak(graph_module: torch.fx.GraphModule, inputs: list) -> int:
    """Peak bytes the CUDA caching allocator hands out during one call, beyond what was allocated before."""
    with torch.no_grad():
        graph_module(*inputs)  # warm-up: library workspaces (cuBLAS) are allocated once and kept
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = graph_module(*inputs)
        del result
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(SIZES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="also write the tables as markdown to this file")
    args = parser.parse_args()
    rows, formulas = [], []
    for name in args.targets:
        torch.manual_seed(0)
        target = load(name)
        model = target.model.to(args.device)
        example = tuple(a.to(args.device) if isinstance(a, torch.Tensor) else a for a in target.args)
        posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
        planner = Planner(model, example, posterior, target.dims)
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
                by_allocator = (cuda_peak(paired.graph_module, inputs) if args.device == "cuda"
                                else profiler_peak(paired.graph_module, *inputs))
                rows.append([name, structure, len(layers), ", ".join(f"{k}={v}" for k, v in sizes.items()),
                             format_bytes(predicted), format_bytes(by_allocator), format_bytes(by_ops),
                             f"{100 * (predicted / by_allocator - 1):+.1f}%", f"{seconds:.2f}"])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
            formulas.append([name, structure, str(report.peak_bytes)])
    allocator = f"measured (CUDA allocator, {torch.cuda.get_device_name()})" if args.device == "cuda" \
        else "measured (allocator)"
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = "\n\n".join([
        f"torch {torch.__version__}, {where}",
        tabulate(rows, headers=["target", "activations", "Bayesian layers", "sizes", "predicted peak", allocator,
                                "measured (ops)", "error", "run s"], tablefmt="github"),
        tabulate(formulas, headers=["target", "activations", "predicted peak working memory (bytes)"],
                 tablefmt="github"),
    ])
    print(text)
    if args.out:
        command = "python benchmarks/bench_planner.py " + " ".join(sys.argv[1:])
        with open(args.out, "w") as out:
            out.write(f"# Cost model against measurement\n\nGenerated by `{command.strip()}`.\n\n{text}\n")


if __name__ == "__main__":
    main()
