"""The model zoo: fxstream on every torchvision classifier, ~40 timm families and ~50 Hugging Face families.

Each model is built with random weights in eval mode at a small size (10
classes, the smallest input it accepts, tiny transformer configs; float64 up
to --float64-below parameters, else float32) and checked with
``fxstream.zoo.check`` under two diagonal posteriors with 2% relative
standard deviation: the last two parameters (``last-2``, the head) and every
parameter (``all``). A row reports

- status: ``ok`` when both posteriors ran, the predictive means equal the
  model's own forward (float rounding aside) and the variances are finite and
  >= 0; else the first line of the error;
- the median and 90th percentile over output elements of the relative
  variance error against Monte Carlo over the same posterior (N draws; the
  Monte Carlo estimate itself has relative standard error sqrt(2/(N-1)), so
  errors near that size are sampling noise). Monte Carlo gets a time budget
  per posterior (--mc-seconds) and is skipped ("-") where fewer than
  --min-samples draws fit;
- the time of ``streamline`` plus its first call (capture, rewrite; eager
  backend: no compile) for the ``all`` posterior, and the time of a later call
  over the model's own forward, for both posteriors.

    python benchmarks/bench_zoo.py --out docs/zoo.md            # everything (long: see docs/zoo.md)
    python benchmarks/bench_zoo.py --quick                      # the CI subset (tests/test_zoo.py)
    python benchmarks/bench_zoo.py --only resnet gpt2 --json /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fxstream.zoo.catalogue import QUICK, SOURCES, catalogue  # noqa: E402
from fxstream.zoo.run import POSTERIORS, ZooRow, evaluate, row_from_dict, row_to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTRO = """\
fxstream on architectures nobody here wrote, unchanged: every image classifier
torchvision lists, the smallest variant of ~40 timm families, and tiny configs
of ~50 Hugging Face transformers families (encoders, decoders, the encoders of
T5, BART and Whisper, vision and audio models). Each is built with random
weights in eval mode at a small size: 10 classes, the smallest input the
architecture accepts (ViTs at 2x2 patches), 2 layers of width 32 for
transformers. Models with at most 5M parameters run in float64, so that float
rounding stays far below Monte Carlo's noise; larger ones in float32.

Each model is checked (`fxstream.zoo.check_many`, eager backend) under two
diagonal posteriors with 2% relative standard deviation,
var = (0.02 |w|)^2 + (2e-5 mean|w|)^2:

- **last-2**: the last two floating parameters in `named_parameters()` order,
  usually the head's weight and bias. The output is linear in them, so
  fxstream's variance is exact and its gap to Monte Carlo is sampling noise.
- **all**: every parameter. Every op then carries covariance, and the method's
  approximations show: diagonal activations (correlations between the elements
  of an activation dropped), residual branches added as independent, and, in
  transformers, attention probabilities taken from the mean queries and keys
  (the paper's rule: the query and key weights' own uncertainty is not
  propagated, while Monte Carlo samples it).

**status** is `ok` when both posteriors ran, the predictive means equal the
model's own forward (relative 1e-10 in float64, 1e-4 in float32) and the
variances are finite and >= 0; otherwise the first line of each posterior's
error (fxstream's, or where a torch error came from inside fxstream, the file
and function). **median / p90** are the median and 90th percentile over output
elements of |var - var_MC| / var_MC, against Monte Carlo over the same
posterior (weights drawn, the unchanged model run through
`torch.func.functional_call`); under **all**, (xR) is the median of
var / var_MC, below 1 where fxstream's variance is the smaller. A Monte Carlo variance from N draws has a
relative standard error of sqrt(2 / (N - 1)) (0.032 for 2000 draws, 0.071 for
400), so errors of that size are sampling noise. Monte Carlo has a time budget
per posterior and is skipped (`-`) where fewer than 100 draws fit, which for
the **all** posterior is any model with more than a few million weights: a
draw costs a sample of every weight. **streamline + 1st call** is the time
from `fxstream.streamline` to its first predictive (Dynamo capture, rewrite;
no compile on the eager backend); **call / forward** is a later call's time
over the model's own forward, both eager.

Run `python benchmarks/bench_zoo.py --help` for the options; `--only REGEX`
runs a part, `--quick` the CI subset of `tests/test_zoo.py`. To check your own
model the same way:

```python
from fxstream.zoo import check, relative_posterior
result = check(model.eval(), (x,), relative_posterior(model), samples=1000)
result.means_exact, result.variances_valid, result.median_error, result.p90_error
```
"""


def _errors(result, ratio: bool = False) -> str:
    if result is None:
        return ""
    if result.median_error is None:
        return "-"
    shown = f" (x{result.median_ratio:.2f})" if ratio and result.median_ratio is not None else ""
    return f"{result.median_error:.3f} / {result.p90_error:.3f}{shown}"


def _ratio(result) -> str:
    return f"{result.time_ratio:.1f}x" if result is not None else ""


def table_row(row: ZooRow) -> list[str]:
    last, every = row.results.get("last-2"), row.results.get("all")
    draws = "/".join(str(r.mc_samples) if r is not None and r.mc_samples else "-" for r in (last, every))
    status = row.status if len(row.status) <= 160 else row.status[:157] + "..."
    return [
        row.name.split("/", 1)[1], row.source, f"{row.params / 1e6:.1f}M" if row.params else "", row.input,
        row.dtype, status.replace("|", "\\|"), _errors(last), _errors(every, ratio=True), draws,
        f"{every.streamline_s:.1f}" if every is not None else "",
        " / ".join(filter(None, (_ratio(last), _ratio(every)))),
    ]


HEADERS = ["model", "source", "params", "input", "dtype", "status", "last-2: median / p90 rel. var. error",
           "all: median / p90 (median var / var_MC)", "MC draws (last-2 / all)", "streamline + 1st call, all (s)",
           "call / forward (last-2 / all)"]


def summary(rows: list[ZooRow]) -> str:
    counts = []
    for source in sorted({r.source for r in rows}, key=SOURCES.index):
        mine = [r for r in rows if r.source == source]
        ok = sum(r.ok for r in mine)
        head_only = sum(not r.ok and "last-2" in r.results and r.results["last-2"].ok for r in mine)
        counts.append([source, len(mine), ok, head_only, len(mine) - ok])
    counts.append(["total", *(sum(c[i] for c in counts) for i in range(1, 5))])
    return tabulate(counts, headers=["source", "models", "ok (both posteriors: exact means, valid variances)",
                                     "of the failed: last-2 ok", "failed"], tablefmt="github")


def failures(rows: list[ZooRow]) -> str:
    """Distinct failures: error type and op (or cause), the posteriors hitting it, where, and the models."""
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        for posterior, (kind, what, message) in row.errors.items():
            group = groups.setdefault((kind, what), {"models": [], "posteriors": set(), "where": set()})
            if row.name not in group["models"]:
                group["models"].append(row.name)
            group["posteriors"].add(posterior)
            group["where"].add(_where(kind, message))
        for posterior, result in row.results.items():
            if not result.ok:
                kind = "mean differs from the forward" if not result.means_exact else "invalid variances"
                group = groups.setdefault((kind, ""), {"models": [], "posteriors": set(), "where": set()})
                group["models"].append(row.name)
                group["posteriors"].add(posterior)
    lines = []
    for (kind, what), group in sorted(groups.items(), key=lambda kv: -len(kv[1]["models"])):
        posteriors = ", ".join(p for p in (*POSTERIORS, "build") if p in group["posteriors"])
        where = "; ".join(sorted(w for w in group["where"] if w))
        lines.append([kind, what.replace("|", "\\|")[:100], posteriors, where.replace("|", "\\|")[:200],
                      len(group["models"]), ", ".join(m.split("/", 1)[1] for m in group["models"])])
    headers = ["error", "op / cause", "posteriors", "where", "models", "which"]
    return tabulate(lines, headers=headers, tablefmt="github") if lines else "none"


def _where(kind: str, message: str) -> str:
    """The module class (UnsupportedOpError) or the fxstream file and function an error names."""
    if kind == "UnsupportedOpError":
        found = re.search(r" in \S+ \((\w+)\)$", message)
        return found.group(1) if found else ""
    found = re.search(r"\((fxstream/[^)]+)\)", message)
    return found.group(1) if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only the CI subset: {', '.join(QUICK)}")
    parser.add_argument("--only", nargs="+", metavar="REGEX", help="only models whose name matches one of these")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--samples", type=int, nargs=2, metavar=("LAST2", "ALL"), default=None,
                        help="Monte Carlo draws per posterior (default 2000 400; --quick 1000 200)")
    parser.add_argument("--mc-seconds", type=float, default=15.0, help="Monte Carlo time budget per posterior")
    parser.add_argument("--min-samples", type=int, default=100,
                        help="skip Monte Carlo where fewer draws than this fit in the budget")
    parser.add_argument("--float64-below", type=float, default=5e6,
                        help="models with at most this many parameters run in float64")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model before it is stopped")
    parser.add_argument("--repeats", type=int, default=3, help="calls timed (median) per posterior and forward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the markdown page here (e.g. docs/zoo.md)")
    parser.add_argument("--json", type=Path, help="also write every row here, one JSON object a line, as it ends")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and run only the models missing there")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = catalogue(tuple(args.sources))
    if args.quick:
        entries = [e for e in entries if e.name in QUICK]
    if args.only:
        entries = [e for e in entries if any(re.search(p, e.name) for p in args.only)]
    samples = dict(zip(POSTERIORS, args.samples or ((1000, 200) if args.quick else (2000, 400))))
    done: dict[str, ZooRow] = {}
    if args.resume and args.json and args.json.exists():
        done = {row.name: row for row in map(row_from_dict, map(json.loads, args.json.read_text().splitlines()))}
    elif args.json:
        args.json.write_text("")
    rows: list[ZooRow] = []
    progress = tqdm(entries, unit="model", dynamic_ncols=True)
    for entry in progress:
        if entry.name in done:
            rows.append(done[entry.name])
            continue
        progress.set_description(entry.name)
        row = evaluate(entry, samples=samples, mc_seconds=args.mc_seconds, min_samples=args.min_samples,
                       float64_below=int(args.float64_below), timeout=args.timeout, repeats=args.repeats)
        rows.append(row)
        progress.write(f"{row.name}: {row.status} ({row.seconds:.0f} s)")
        if args.json:
            with args.json.open("a") as file:
                file.write(json.dumps(row_to_dict(row), default=str) + "\n")
    model_minutes = sum(row.seconds for row in rows) / 60
    argv, shown = sys.argv[1:], []
    while argv:  # the command without the bookkeeping of a run in parts (--json FILE --resume)
        arg = argv.pop(0)
        if arg == "--json":
            argv.pop(0)
        elif arg != "--resume":
            shown.append(arg)
    command = "python benchmarks/bench_zoo.py " + shlex.join(shown)
    parts = ", run in parts with `--json FILE --resume`" if args.resume else ""
    setting = (f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, eager backend; "
               f"Monte Carlo {samples['last-2']} / {samples['all']} draws (last-2 / all) within "
               f"{args.mc_seconds:g} s per posterior, at least {args.min_samples}; {len(rows)} models in "
               f"{model_minutes:.0f} min")
    text = "\n\n".join([
        f"Produced by `{command}`{parts} ({setting}).",
        "## Summary\n\n" + summary(rows),
        "## Distinct failures\n\n" + failures(rows),
        "## Models\n\n" + tabulate([table_row(r) for r in rows], headers=HEADERS, tablefmt="github"),
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Model zoo\n\n{INTRO}\n{text}\n")


if __name__ == "__main__":
    main()
