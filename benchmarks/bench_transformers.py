"""Transformers benchmark: time and peak memory of fxstream against the deterministic forward and MC-10.

Models: GPT-2-small (12 blocks, d=768, vocab 50257) and ViT-B/16 (224x224, 12
blocks, d=768) with random weights, from `transformers` configs. Rows:
deterministic forward, fxstream with every linear layer Bayesian (diagonal),
fxstream with only the last 2 blocks Bayesian (each also with
``variance_matmul="bfloat16"``: the variance GEMMs on bfloat16 operands; the
last also with ``residual="linearised"``: the MLP branches' skip covariance), and
Monte Carlo with 10 weight samples, each on the eager and the Inductor backend.

Time: the rows of one model and backend are built and compiled first, then
timed in interleaved rounds (each round calls every row once), so that machine
load hits all rows alike and the ratios hold; the median over --repeats rounds
(MC-10: at most 3) on --clock. On a GPU every call ends with a device
synchronise. Peak memory: what one call allocates beyond what existed before
it, from torch's CPU allocator events (torch.profiler) or, on a GPU,
torch.cuda.max_memory_allocated. FLOPs: what ``torch.utils.flop_counter`` counts
in one call (matrix products, convolutions, attention), the same for every
backend; where matrix products dominate a forward, its time ratio to the
deterministic forward stays close to its FLOP ratio at the same precision.

    python benchmarks/bench_transformers.py --out benchmarks/results/transformers.md
    python benchmarks/bench_transformers.py --device cuda --out docs/results/transformers_gpu.md
    python benchmarks/bench_transformers.py --accuracy      # Monte Carlo gaps on the tiny test models
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode
from timing import CLOCK_HELP, CLOCKS, median_seconds

from fxstream.planner.measure import profiler_peak

ROOT = Path(__file__).resolve().parents[1]
MODES = ("deterministic", "fxstream all linear", "fxstream last 2 blocks", "fxstream all linear, bf16 var GEMMs",
         "fxstream last 2 blocks, bf16 var GEMMs", "fxstream last 2 blocks, residual=linearised", "MC-10")


def build(name: str, batch: int, seq: int, device: str = "cpu"):
    """A random-weight GPT-2-small or ViT-B/16 in eval mode and an input batch, on ``device``."""
    import transformers

    torch.manual_seed(0)
    if name == "gpt2-small":
        config = transformers.GPT2Config(attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
        model, x = transformers.GPT2LMHeadModel(config), torch.randint(0, config.vocab_size, (batch, seq))
    else:
        config = transformers.ViTConfig(attn_implementation="sdpa", num_labels=1000)
        model, x = transformers.ViTForImageClassification(config), torch.randn(batch, 3, 224, 224)
    return model.eval().to(device), x.to(device)


def linear_weights(model: torch.nn.Module) -> list[str]:
    """Glob patterns of every linear-layer weight: the blocks and the head (GPT-2: the tied wte/lm_head)."""
    return ["transformer.wte.weight", "*.attn.c_attn.weight", "*.attn.c_proj.weight", "*.mlp.c_fc.weight", "*.mlp.c_proj.weight",
            "*.attention.*.weight", "*.intermediate.dense.weight", "*.output.dense.weight", "classifier.weight"]


def runner(model, x, mode: str, backend: str):
    """A zero-argument callable for one benchmark row."""
    from fxstream.select import select

    if mode == "deterministic":
        compiled = model if backend == "eager" else torch.compile(model, backend="inductor", fullgraph=True)
        return lambda: compiled(x)
    if mode == "MC-10":
        params = {n: p.detach() for n, p in model.named_parameters()}
        variances = select(model, include=linear_weights(model), variance=1e-6)
        names = variances.parameter_names()
        compiled = model if backend == "eager" else torch.compile(model, backend="inductor", fullgraph=True)

        def monte_carlo():
            outputs = []
            for _ in range(10):
                drawn = dict(params)
                for n in names:
                    drawn[n] = params[n] + 1e-3 * torch.randn_like(params[n])
                outputs.append(torch.func.functional_call(compiled, drawn, (x,)).logits)
            stacked = torch.stack(outputs)
            return stacked.mean(0), stacked.var(0)

        return monte_carlo
    streamlined = streamlined_model(model, mode, backend)
    return lambda: streamlined(x)


def streamlined_model(model, mode: str, backend: str):
    """The streamlined model of an fxstream row."""
    import fxstream
    from fxstream.select import last_blocks, select

    every_linear = mode.startswith("fxstream all linear")
    include = linear_weights(model) if every_linear else last_blocks(model, 2)
    exclude = [] if every_linear else ["*norm*", "*ln_*", "*.bias"]
    posterior = select(model, include=include, exclude=exclude, variance=1e-6)
    variance_matmul = "bfloat16" if mode.endswith("bf16 var GEMMs") else "exact"
    residual = "linearised" if mode.endswith("residual=linearised") else "paper"
    return fxstream.streamline(model, posterior, backend=backend, variance_matmul=variance_matmul, residual=residual)


def call_flops(model, x, mode: str) -> int:
    """FLOPs of one call of a row, as ``torch.utils.flop_counter`` counts them (matmul, conv, attention).

    The same for every backend: an fxstream row counts its rewritten graph, run
    eagerly outside Dynamo (which refuses the counter's dispatch mode). Where
    matrix products dominate the forward, the time ratio stays close to this one.
    """
    if mode == "MC-10":
        return 10 * call_flops(model, x, "deterministic")
    with torch.no_grad():
        if mode == "deterministic":
            with FlopCounterMode(display=False) as counter:
                model(x)
            return counter.get_total_flops()
        streamlined = streamlined_model(model, mode, "eager")
        streamlined(x)
        graph = streamlined.graphs[-1]
        with FlopCounterMode(display=False) as counter:
            graph.paired.graph_module(*graph.captured.example_inputs)
    return counter.get_total_flops()


def peak_bytes(call, device: str) -> int:
    """Peak bytes one call allocates beyond what was allocated before it.

    CPU: the largest running sum of torch's CPU allocator events (torch.profiler);
    GPU: torch.cuda.max_memory_allocated minus the memory allocated before the call.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return profiler_peak(call)


def measure(model, x, backend: str, modes: list[str], args) -> dict[str, dict]:
    """Time and peak memory of every mode of one model and backend, timed in interleaved rounds."""
    synchronize = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    calls, results = {}, {}
    with torch.no_grad():
        for mode in modes:
            try:
                calls[mode] = runner(model, x, mode, backend)
                calls[mode]()  # compiles
                results[mode] = {"peak_mib": peak_bytes(calls[mode], args.device) / 2**20}
            except Exception as error:  # one failing row is reported, the others still run
                calls.pop(mode, None)
                results[mode] = {"error": str(error).splitlines()[0][:80]}
        quick = {mode: call for mode, call in calls.items() if mode != "MC-10"}
        seconds = median_seconds(quick, args.repeats, args.clock, warmup=1, synchronize=synchronize)
        if "MC-10" in calls:
            seconds |= median_seconds({"MC-10": calls["MC-10"]}, min(args.repeats, 3), args.clock, warmup=0,
                                      synchronize=synchronize)
    for mode, value in seconds.items():
        results[mode]["time_s"] = value
    del calls
    torch._dynamo.reset()  # compiled graphs hold their posterior buffers: free them before the next model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return results


def table(args) -> str:
    rows = []
    for name in args.models:
        model, x = build(name, args.batch, args.seq, args.device)
        flops = {mode: call_flops(model, x, mode) for mode in ("deterministic", *args.modes)} if args.flops else {}
        for backend in args.backends:
            results = measure(model, x, backend, args.modes, args)
            base = results.get("deterministic", {}).get("time_s")
            for mode in args.modes:
                result = results[mode]
                flop_ratio = f"{flops[mode] / flops['deterministic']:.2f}x" if flops else ""
                if "error" in result:
                    rows.append([name, backend, mode, "failed", result["error"], flop_ratio, ""])
                else:
                    ratio = f"{result['time_s'] / base:.2f}x" if base else ""
                    rows.append([name, backend, mode, f"{result['time_s'] * 1e3:.1f}", ratio, flop_ratio,
                                 f"{result['peak_mib']:.0f}"])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
        del model, x
    where = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}" if args.device == "cuda"
             else f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    shape = (f"batch {args.batch}, GPT-2 sequence {args.seq}, ViT 224x224 (197 tokens), float32, {where}; "
             f"median {args.clock} time of {args.repeats} interleaved rounds (MC-10: {min(args.repeats, 3)})")
    return shape + "\n\n" + tabulate(
        rows, headers=["model", "backend", "mode", "time (ms)", "vs deterministic", "FLOPs vs deterministic",
                       "peak (MiB)"], tablefmt="github"
    )


def accuracy(samples: int, models: list[str]) -> str:
    """Median and 90th-percentile relative variance error against Monte Carlo on the tiny test models, with the
    Monte Carlo reference's own relative standard error (median and p90 over outputs), which
    tests/test_transformers.py adds to its guards."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_transformers import monte_carlo_moments, relative_errors, streamlined_var, tiny, weight_variances

    settings = [
        ("paper rules", {}, False),
        ("norm=linearised", {"norm": "linearised"}, False),
        ("residual=linearised", {"residual": "linearised"}, False),
        ("full activations, norm=linearised", {"activation_cov": "full", "norm": "linearised"}, False),
        ("paper rules, Q/K sampled too", {}, True),
        ("attention=linearised, Q/K sampled", {"attention": "linearised", "norm": "linearised"}, True),
        ("full + linearised, Q/K sampled", {"activation_cov": "full", "attention": "linearised",
                                           "norm": "linearised"}, True),
    ]
    rows = []
    for name in models:
        model, x = tiny(name)
        references = {}  # one Monte Carlo run per set of sampled weights, shared by the settings
        for label, options, with_query_key in settings:
            variances = weight_variances(model, 1e-3, with_query_key)
            if with_query_key not in references:
                references[with_query_key] = monte_carlo_moments(model, x, variances, samples)
            reference, se = references[with_query_key]
            spread = [f"{se.median().item():.3f}", f"{se.quantile(0.9).item():.3f}"]
            try:
                median, p90 = relative_errors(streamlined_var(model, x, variances, **options).var, reference)
                rows.append([name, label, f"{median:.3f}", f"{p90:.3f}", *spread])
            except Exception as error:  # a setting a model does not support is reported, not hidden
                rows.append([name, label, "error", str(error).splitlines()[0][:60], *spread])
            print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    return (f"Monte Carlo with {samples} weight samples, weight variances 1e-3 * mean|W|^2 (BERT: encoder only), "
            f"float64; MC SE: relative standard error of the Monte Carlo variances, median and p90 over outputs\n\n"
            + tabulate(rows, headers=["model", "setting", "median rel. var. error", "p90", "MC SE (median)",
                                      "MC SE (p90)"], tablefmt="github"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "vit-b16"])
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                        help=f"rows to run (default: all of {', '.join(repr(m) for m in MODES)})")
    parser.add_argument("--accuracy", action="store_true", help="print the Monte Carlo gap table instead")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--tiny-models", nargs="+", default=["gpt2", "vit", "bert", "llama", "phi3"],
                        help="tiny test models for --accuracy")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count every row's FLOPs (an extra eager capture per row; the same on every device)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help=CLOCK_HELP)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = accuracy(args.samples, args.tiny_models) if args.accuracy else table(args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/bench_transformers.py " + shlex.join(sys.argv[1:])
        args.out.write_text(f"# Transformers benchmark\n\nProduced by `{command}`.\n\n{text}\n")


if __name__ == "__main__":
    main()
