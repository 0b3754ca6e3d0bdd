"""Transformers benchmark: time and peak memory of fxstream against the deterministic forward and MC-10.

Models: GPT-2-small (12 blocks, d=768, vocab 50257) and ViT-B/16 (224x224, 12
blocks, d=768) with random weights, from `transformers` configs. Rows:
deterministic forward, fxstream with every linear layer Bayesian (diagonal),
fxstream with only the last 2 blocks Bayesian (each also with
``variance_matmul="bfloat16"``: the variance GEMMs on bfloat16 operands), and
Monte Carlo with 10 weight samples, each on the eager and the Inductor backend.

Time: median of --repeats calls after a warm-up call (compilation excluded).
Peak memory, CPU: each row runs in a fresh subprocess; after the warm-up the
process's peak resident set (Linux VmHWM) is reset through /proc/self/clear_refs
and the reported number is the peak RSS during the timed calls minus the RSS
before them, i.e. what the call itself allocates. On a GPU (--device cuda) the
rows run in one process, timed with the device synchronised, and the peak is
torch.cuda.max_memory_allocated during the timed calls minus the memory
allocated before them.

    python benchmarks/bench_transformers.py --out benchmarks/results/transformers.md
    python benchmarks/bench_transformers.py --device cuda --out docs/results/transformers_gpu.md
    python benchmarks/bench_transformers.py --accuracy      # Monte Carlo gaps on the tiny test models
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
MODES = ("deterministic", "fxstream all linear", "fxstream last 2 blocks", "fxstream all linear, bf16 var GEMMs",
         "fxstream last 2 blocks, bf16 var GEMMs", "MC-10")


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
    import fxstream
    from fxstream.select import last_blocks, select

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
    every_linear = mode.startswith("fxstream all linear")
    include = linear_weights(model) if every_linear else last_blocks(model, 2)
    exclude = [] if every_linear else ["*norm*", "*ln_*", "*.bias"]
    posterior = select(model, include=include, exclude=exclude, variance=1e-6)
    variance_matmul = "bfloat16" if mode.endswith("bf16 var GEMMs") else "exact"
    streamlined = fxstream.streamline(model, posterior, backend=backend, variance_matmul=variance_matmul)
    return lambda: streamlined(x)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def median_time(call, repeats: int, synchronize=lambda: None) -> float:
    """Median seconds of ``repeats`` calls, each ended by ``synchronize`` (the device's, on a GPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cuda(name: str, mode: str, backend: str, batch: int, seq: int, repeats: int) -> dict:
    """Run one row on the GPU: warm-up (compiles), then synchronised timed calls and the allocator's peak."""
    model, x = build(name, batch, seq, "cuda")
    call = runner(model, x, mode, backend)
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = median_time(call, repeats, torch.cuda.synchronize)
        peak = torch.cuda.max_memory_allocated() - before
    del call, model, x
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"time_s": seconds, "peak_mib": peak / 2**20}


def measure(name: str, mode: str, backend: str, batch: int, seq: int, repeats: int) -> dict:
    """Run one row in this process: warm-up (compiles), then timed calls with a fresh peak RSS."""
    model, x = build(name, batch, seq)
    call = runner(model, x, mode, backend)
    with torch.no_grad():
        call()
        before = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        seconds = median_time(call, repeats)
        peak = _rss_kib("VmHWM")
    return {"time_s": seconds, "peak_mib": max(peak - before, 0) / 1024}


def table(args) -> str:
    rows = []
    for name in args.models:
        for backend in args.backends:
            base = None
            for mode in args.modes:
                if args.device == "cuda":
                    try:
                        result = measure_cuda(name, mode, backend, args.batch, args.seq, args.repeats)
                    except Exception as error:  # one failing row is reported, the others still run
                        rows.append([name, backend, mode, "failed", str(error).splitlines()[0][:80], ""])
                        print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
                        continue
                else:
                    command = [sys.executable, __file__, "--one", json.dumps([name, mode, backend]),
                               "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                    if done.returncode != 0:
                        rows.append([name, backend, mode, "failed", done.stderr.strip().splitlines()[-1][:80], ""])
                        continue
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                base = result["time_s"] if mode == "deterministic" else base
                ratio = f"{result['time_s'] / base:.2f}x" if base else ""
                rows.append([name, backend, mode, f"{result['time_s'] * 1e3:.1f}", ratio, f"{result['peak_mib']:.0f}"])
                print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    where = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}" if args.device == "cuda"
             else f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    shape = f"batch {args.batch}, GPT-2 sequence {args.seq}, ViT 224x224 (197 tokens), float32, {where}"
    return shape + "\n\n" + tabulate(
        rows, headers=["model", "backend", "mode", "time (ms)", "vs deterministic", "peak (MiB)"], tablefmt="github"
    )


def accuracy(samples: int, models: list[str]) -> str:
    """Median and 90th-percentile relative variance error against Monte Carlo on the tiny test models."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_transformers import monte_carlo_variance, relative_errors, streamlined_var, tiny, weight_variances

    settings = [
        ("paper rules", {}, False),
        ("norm=linearised", {"norm": "linearised"}, False),
        ("full activations, norm=linearised", {"activation_cov": "full", "norm": "linearised"}, False),
        ("paper rules, Q/K sampled too", {}, True),
        ("attention=linearised, Q/K sampled", {"attention": "linearised", "norm": "linearised"}, True),
        ("full + linearised, Q/K sampled", {"activation_cov": "full", "attention": "linearised",
                                           "norm": "linearised"}, True),
    ]
    rows = []
    for name in models:
        model, x = tiny(name)
        for label, options, with_query_key in settings:
            variances = weight_variances(model, 1e-3, with_query_key)
            reference = monte_carlo_variance(model, x, variances, samples)
            try:
                median, p90 = relative_errors(streamlined_var(model, x, variances, **options).var, reference)
                rows.append([name, label, f"{median:.3f}", f"{p90:.3f}"])
            except Exception as error:  # a setting a model does not support is reported, not hidden
                rows.append([name, label, "error", str(error).splitlines()[0][:60]])
            print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    return f"Monte Carlo with {samples} weight samples, weight variances 1e-3 * mean|W|^2, float64\n\n" + tabulate(
        rows, headers=["model", "setting", "median rel. var. error", "p90"], tablefmt="github"
    )


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
    parser.add_argument("--tiny-models", nargs="+", default=["gpt2", "vit", "bert", "llama"],
                        help="tiny test models for --accuracy")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, mode, backend = json.loads(args.one)
        print(json.dumps(measure(name, mode, backend, args.batch, args.seq, args.repeats)))
        return
    text = accuracy(args.samples, args.tiny_models) if args.accuracy else table(args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/bench_transformers.py " + shlex.join(sys.argv[1:])
        args.out.write_text(f"# Transformers benchmark\n\nProduced by `{command}`.\n\n{text}\n")


if __name__ == "__main__":
    main()
