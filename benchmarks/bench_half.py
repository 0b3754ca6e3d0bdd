"""Variances of bfloat16 and float16 models against the same model in float32.

For each zoo model (random weights, ``relative_posterior`` over every parameter,
eager backend), the model is streamlined in float32 and again cast to bfloat16 and
float16; the table gives the relative error of the output variances (median and
max) in units of the dtype's machine epsilon (bfloat16 2^-7, float16 2^-10), and
the relative error of the means (the forward's own rounding) for scale. A float16
model's covariances are computed in float32 (``fxstream.rules.registry.covariance_dtype``).

Run:  .venv/bin/python benchmarks/bench_half.py --out benchmarks/results/half.md
      .venv/bin/python benchmarks/bench_half.py --quick      (the MLP only, seconds)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream

MODELS = ("mlp", "torchvision/resnet18", "timm/convnext_atto", "transformers/gpt2", "transformers/llama",
          "transformers/bert")


def _mlp() -> tuple[torch.nn.Module, tuple, None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).eval()
    return model, (torch.randn(4, 16),), None


def _build(name: str) -> tuple[torch.nn.Module, tuple, str | int | None]:
    if name == "mlp":
        return _mlp()
    from fxstream.zoo.catalogue import catalogue

    built = {entry.name: entry for entry in catalogue()}[name].build()
    return built.model, built.args, built.output


def rows(names: tuple[str, ...]) -> list[list]:
    from fxstream.zoo.harness import relative_posterior

    table = []
    for name in names:
        model, args, output = _build(name)
        posterior = relative_posterior(model)
        reference = fxstream.streamline(model, posterior, backend="eager", output=output)(*args)
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(dtype)
            cast = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = fxstream.streamline(half, posterior, backend="eager", output=output)(*cast)
            eps = torch.finfo(dtype).eps
            error = (pred.var.float() - reference.var).abs() / reference.var
            mean_error = (pred.mean.float() - reference.mean).abs().max() / reference.mean.abs().max()
            table.append([name, str(dtype).removeprefix("torch."), str(pred.var.dtype).removeprefix("torch."),
                          f"{error.median() / eps:.2f}", f"{error.max() / eps:.2f}", f"{mean_error / eps:.2f}",
                          f"{reference.var.min():.1e} .. {reference.var.max():.1e}"])
            print(" | ".join(map(str, table[-1])), file=sys.stderr, flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP only")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = rows(MODELS[:1] if args.quick else MODELS)
    text = "\n".join([
        f"Command: `python {' '.join(sys.argv)}`; machine: {platform.machine()} {platform.processor() or ''}, "
        f"{args.threads} thread(s); torch {torch.__version__}.",
        "",
        tabulate(table, headers=["model", "dtype", "variance dtype", "median var error (eps)",
                                 "max var error (eps)", "max mean error (eps)", "float32 variances"],
                 tablefmt="github"),
    ])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
