"""Varying batch and sequence length: 50 calls at changing shapes against the same calls at one fixed shape.

A GPT-2 (or, with ``--model llama``, a Llama) with its last block Bayesian (diagonal posterior, diagonal
activations) is streamlined once per row and warmed up with two calls: at the
fixed shape, and at another sequence length, which compiles the graph with a
symbolic sequence length as well (a StreamlinedModel's second and last graph
for these inputs). The warm-up's seconds are in the table. Each row then
times 50 calls whose (batch, sequence length) are drawn from a seeded list
(sizes >= 2, so Dynamo's 0/1 specialisation does not enter), and the same
number of calls at one fixed shape of the mean token count. The varying time
includes whatever a new shape costs (a capture and compile where a graph is
specialised), which is the point. Rows:

- ``lowered``: the StreamlinedModel as shipped (graph lowered once to ATen);
- ``rule graph``: the same, but each graph runs the pruned rule graph (rule
  functions and their JVPs per call), the eager path before lowering.

Rows are interleaved per round; the ratio varying / fixed is quoted per row.

    python benchmarks/bench_shapes.py [--quick] [--device cuda] [--gpt2-small] [--out benchmarks/results/shapes.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
from tabulate import tabulate

import fxstream
from fxstream.select import last_blocks, select

CALLS = 50
TARGET = 1.2


def build(name: str, gpt2_small: bool, layers: int, width: int, device: str):
    """The model (GPT-2 or a Llama of the same size) with its last block Bayesian, and its config."""
    import transformers

    torch.manual_seed(0)
    heads = max(1, width // 64)
    if name == "llama":
        config = transformers.LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=heads, intermediate_size=4 * width, vocab_size=4096,
                                          max_position_embeddings=256, use_cache=False, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    elif gpt2_small:
        config = transformers.GPT2Config(attn_implementation="sdpa", use_cache=False)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=4096,
                                         n_positions=256, attn_implementation="sdpa", use_cache=False)
        model = transformers.GPT2LMHeadModel(config)
    model = model.eval().to(device)
    posterior = select(model, include=last_blocks(model, 1), exclude=["*ln_*", "*norm*"], variance=1e-4)
    return model, posterior, config


def shapes(calls: int, max_batch: int, max_seq: int) -> list[tuple[int, int]]:
    rng = random.Random(0)
    return [(rng.randint(2, max_batch), rng.randint(2, max_seq)) for _ in range(calls)]


def streamlined(model, posterior, backend: str, lowered: bool):
    made = fxstream.streamline(model, posterior, backend=backend)
    if not lowered:  # every graph runs the pruned rule graph instead of its lowering
        keep = made.options.on_compile

        def unlowered(graph) -> None:
            graph.compiled = graph.paired.graph_module
            keep(graph)

        made.options.on_compile = unlowered
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--gpt2-small", action="store_true", help="the real GPT-2 small configuration (12x768)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq", type=int, default=64)
    parser.add_argument("--backends", default="eager,inductor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="eager only, 10 calls, 1 round (for CI)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    calls, rounds, backends = CALLS, args.rounds, args.backends.split(",")
    if args.quick:
        calls, rounds, backends = 10, 1, ["eager"]
    model, posterior, config = build(args.model, args.gpt2_small, args.layers, args.width, args.device)
    varying = shapes(calls, args.max_batch, args.max_seq)
    tokens = statistics.mean(b * s for b, s in varying)
    fixed_shape = (max(2, round(statistics.mean(b for b, _ in varying))), 0)
    fixed_shape = (fixed_shape[0], max(2, round(tokens / fixed_shape[0])))
    ids = {shape: torch.randint(0, config.vocab_size, shape, device=args.device) for shape in set(varying)}
    ids[fixed_shape] = torch.randint(0, config.vocab_size, fixed_shape, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = [(backend, lowered) for backend in backends for lowered in (True, False)]
    times = {row: {"varying": [], "fixed": [], "warm-up": []} for row in rows}
    other_length = (fixed_shape[0], fixed_shape[1] + 1)
    ids[other_length] = torch.randint(0, config.vocab_size, other_length, device=args.device)
    graphs = {}
    for round_ in range(rounds):
        for row in rows:
            made = streamlined(model, posterior, *row)
            start = time.perf_counter()
            for shape in (fixed_shape, other_length):  # warm-up: both captures and compiles
                made(ids[shape])
            sync()
            times[row]["warm-up"].append(time.perf_counter() - start)
            for kind, sequence in (("varying", varying), ("fixed", [fixed_shape] * calls)):
                sync()
                start = time.perf_counter()
                for shape in sequence:
                    made(ids[shape])
                sync()
                times[row][kind].append(time.perf_counter() - start)
            graphs[row] = len(made.graphs)
    table = []
    for (backend, lowered), measured in times.items():
        vary, fix = statistics.median(measured["varying"]), statistics.median(measured["fixed"])
        table.append([backend, "lowered" if lowered else "rule graph", f"{vary:.3f}", f"{fix:.3f}",
                      f"{vary / fix:.2f}x", graphs[(backend, lowered)], f"{statistics.median(measured['warm-up']):.1f}"])
    size = "GPT-2 small (12x768)" if args.gpt2_small and args.model == "gpt2" else \
        f"{args.model} {args.layers}x{args.width}, vocab 4096"
    header = (f"# Varying shapes: {calls} calls, batch 2-{args.max_batch}, sequence 2-{args.max_seq}; fixed shape "
              f"{fixed_shape} (same mean tokens)\n\n"
              f"Command: `python {' '.join(sys.argv)}`  \nModel: {size}, last block Bayesian (diagonal)  \n"
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, "
              f"torch {torch.__version__}, torch threads {torch.get_num_threads()}  \nTarget: varying / fixed <= "
              f"{TARGET} (lowered rows). Median of {rounds} interleaved rounds, seconds for all {calls} calls.\n\n")
    report = header + tabulate(table, headers=["backend", "graph run", "varying (s)", "fixed (s)", "varying / fixed",
                                               "graphs compiled", "warm-up (s)"], tablefmt="github") + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as out:
            out.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
