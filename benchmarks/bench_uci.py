"""UCI regression: MAP, Monte Carlo, laplace-torch GLM and fxstream over the same Laplace posterior.

The nine standard sets of ../shared/data/uci with their canonical splits (20;
protein 5). Per split:

1. Inputs and target are standardised with the training part's statistics.
   The last 20% of the training split (in its canonical order) is held out
   for validation; the network is trained on the other 80% and is not
   retrained after tuning.
2. MAP: one hidden layer of 50 ReLU units (100 for protein), Adam on
   0.5 * squared error with weight decay 1/N (a unit Gaussian prior on the
   weights, N the number of training points), minibatches of 128 (fewer
   points: full batch), a fixed number of steps with cosine decay.
3. laplace-torch Laplace over all weights, diag and kron (GGN, its default
   curvlinops backend), fitted on the 80% with the noise set to the MAP's
   training RMSE.
4. Tuning on the validation part only: ``fxstream.tune`` chooses the prior
   precision over its default grid (20 values, 1e-4 .. 1e4), each candidate
   scored by the validation NLPD of fxstream's default predictive (one
   streamlined pass; the noise scored from the same pass). Every method below
   predicts from the posterior with that prior precision; each method's
   observation noise is then tuned on the validation part for its own
   predictive (MAP: the posterior scaled to 0). "MC-100 own" also re-tunes
   the prior precision, by Monte Carlo's own validation NLPD: sampling at its
   best, on the posterior that suits it.
5. On the test part, in original target units: NLPD and RMSE of
   - MAP: N(f_MAP(x), sigma_MAP^2);
   - MC-S (S = 100, 1000): the mixture (1/S) sum_s N(f_s(x), sigma^2) over S
     weight draws from laplace-torch's ``la.sample`` (the network batched over
     the draws with ``torch.func.vmap``);
   - GLM: laplace-torch's ``la(x, pred_type="glm")`` plus sigma^2;
   - fxstream (one pass, eager backend), Gaussian N(mean, var + sigma^2):
     ``moments/diag`` (the default: the paper's exact product moments,
     diagonal activations), ``linearised/diag`` (``products="linearised"``),
     ``moments/full`` and ``linearised/full`` (``activation_cov="full"``; the
     last is the GLM predictive exactly).
6. Prediction time of each method on the test inputs: all in the same
   interleaved rounds after warm-up, eager PyTorch on the CPU, median.

    python benchmarks/bench_uci.py --quick                       # 2 sets x 2 splits (CI)
    python benchmarks/bench_uci.py --threads 1 --out docs/uci.md --readme README.md --json /tmp/uci.jsonl
    python benchmarks/bench_uci.py --sets yacht boston --splits 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

import fxstream
from fxstream.tuning import PRIOR_GRID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import CLOCK_HELP, CLOCKS, median_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "uci"

# name: (folder, published MC-dropout test log-likelihood, Gal & Ghahramani 2016, Table 1)
SETS = {
    "boston": ("bostonHousing", -2.40),
    "concrete": ("concrete", -2.94),
    "energy": ("energy", -1.21),
    "kin8nm": ("kin8nm", 1.14),
    "naval": ("naval-propulsion-plant", 4.45),
    "power": ("power-plant", -2.81),
    "protein": ("protein-tertiary-structure", -2.87),
    "wine": ("wine-quality-red", -0.93),
    "yacht": ("yacht", -1.25),
}
QUICK = {"sets": ["yacht", "energy"], "splits": 2}
STRUCTURES = ("diag", "kron")
FX_VARIANTS = {  # name: fxstream.streamline options
    "fxstream moments/diag": {},
    "fxstream linearised/diag": {"products": "linearised"},
    "fxstream moments/full": {"activation_cov": "full"},
    "fxstream linearised/full": {"products": "linearised", "activation_cov": "full"},
}
DEFAULT_FX = "fxstream moments/diag"
NOISE_GRID = tuple(float(s) for s in np.logspace(-3, 0.5, 71))  # standardised units


@dataclass
class Split:
    """One canonical split, standardised with the training part's statistics (validation = its last 20%)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_scale: float  # the target's standard deviation: NLPD and RMSE go back to original units through it


def n_splits(folder: Path) -> int:
    return int(np.loadtxt(folder / "n_splits.txt"))


def load_split(folder: Path, index: int, val_fraction: float = 0.2, dtype=torch.float32) -> Split:
    """Split ``index`` of a set in the layout of ../shared/data/uci (data.txt and index files)."""
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt").astype(int).reshape(-1)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{index}.txt").astype(int)
    test = np.loadtxt(folder / f"index_test_{index}.txt").astype(int)
    n_val = int(round(val_fraction * len(train)))
    fit, val = train[: len(train) - n_val], train[len(train) - n_val:]
    x, y = torch.tensor(data[:, features], dtype=dtype), torch.tensor(data[:, target], dtype=dtype)
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))  # constant columns (naval)
    y_mean, y_std = y[train].mean(), y[train].std()
    xs, ys = (x - x_mean) / x_std, ((y - y_mean) / y_std).unsqueeze(-1)
    return Split(xs[fit], ys[fit], xs[val], ys[val], xs[test], ys[test], float(y_std))


def train_map(split: Split, hidden: int, steps: int = 4000, seed: int = 0) -> torch.nn.Sequential:
    """The MAP network: Adam on 0.5 * squared error with weight decay 1/N (unit Gaussian prior)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(split.x_train.shape[1], hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 1)).to(split.x_train.dtype)
    n = len(split.x_train)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1.0 / n)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    batch = min(128, n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        chosen = order[position: position + batch]
        position += batch
        optimiser.zero_grad()
        loss = 0.5 * (model(split.x_train[chosen]) - split.y_train[chosen]).pow(2).mean()
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def fit_laplace(model: torch.nn.Module, split: Split, structure: str, sigma_noise: float):
    """laplace-torch's Laplace over all weights (GGN), on its own deep copy of the model."""
    from laplace import Laplace

    la = Laplace(copy.deepcopy(model), "regression", subset_of_weights="all", hessian_structure=structure,
                 sigma_noise=sigma_noise, prior_precision=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(split.x_train, split.y_train),
                                         batch_size=512)
    la.fit(loader, progress_bar=False)
    return la


def gaussian_nlpd(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point negative log density of y under N(mean, var)."""
    return 0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)


def best_noise(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor,
               grid: Sequence[float] = NOISE_GRID) -> tuple[float, float]:
    """(noise std, mean NLPD) minimising the mean NLPD of N(mean, var + noise^2) over the grid."""
    noise = torch.tensor(grid, dtype=mean.dtype)
    scores = gaussian_nlpd(mean.reshape(-1, 1), var.reshape(-1, 1) + noise ** 2, y.reshape(-1, 1)).mean(0)
    best = int(scores.argmin())
    return grid[best], float(scores[best])


def mixture_nlpd(samples: torch.Tensor, noise: float, y: torch.Tensor) -> torch.Tensor:
    """Per-point negative log density of y under (1/S) sum_s N(samples[s], noise^2); samples (S, *y.shape)."""
    logp = -gaussian_nlpd(samples, torch.full_like(samples, noise ** 2), y.unsqueeze(0))
    return math.log(samples.shape[0]) - torch.logsumexp(logp, dim=0)


@dataclass
class Tuned:
    """What tuning chose on the validation part, and its validation NLPD (standardised units)."""

    prior_precision: float
    sigma_noise: float
    val_nlpd: float
    at_edge: bool


def tune_split(la, model: torch.nn.Module, split: Split, options: dict,
               grid: Sequence[float] = PRIOR_GRID) -> Tuned:
    """Prior precision and noise by validation NLPD of fxstream's predictive (``fxstream.tune``).

    One streamlined pass over the validation part per prior precision (the
    posterior is swapped in place, no new capture); the noise is scored from
    each pass's means and variances. Leaves ``la`` at the chosen prior.
    """
    predictor = fxstream.streamline(model, fxstream.from_laplace(la), likelihood="regression", sigma_noise=1.0,
                                    backend="eager", **options)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(split.x_val, split.y_val),
                                         batch_size=len(split.x_val))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxstream.FxstreamWarning)  # a choice at a grid edge is recorded instead
        result = fxstream.tune(predictor, loader, prior_precision=grid, sigma_noise=NOISE_GRID, progress=False)
    la.prior_precision = result.prior_precision
    return Tuned(result.prior_precision, result.sigma_noise, result.score,
                 any(edge.startswith("prior_precision") for edge in result.at_edge))


def mc_outputs(model: torch.nn.Module, la, x: torch.Tensor, samples: int, chunk: int = 100) -> torch.Tensor:
    """Network outputs under ``samples`` weight draws from ``la``'s posterior, shape (samples, *out)."""
    names = [name for name, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [math.prod(s) for s in shapes]

    def forward(flat: torch.Tensor) -> torch.Tensor:
        params = {n: piece.reshape(s) for n, piece, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.func.functional_call(model, params, (x,))

    batched = torch.func.vmap(forward)
    outs = []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            draws = la.sample(min(chunk, samples - start)).to(x.dtype)
            outs.append(batched(draws))
    return torch.cat(outs)


def best_mixture_noise(samples: torch.Tensor, y: torch.Tensor,
                       grid: Sequence[float] = NOISE_GRID, stride: int = 5) -> tuple[float, float]:
    """(noise std, mean NLPD) minimising the mean NLPD of the Monte Carlo mixture over the grid.

    Every ``stride``-th grid value first, then every value between the best one's coarse neighbours:
    about a third of the evaluations, the same choice wherever the NLPD has one minimum on the grid.
    """
    def nlpd(index: int) -> float:
        return float(mixture_nlpd(samples, grid[index], y).mean())

    coarse = {i: nlpd(i) for i in range(0, len(grid), stride)}
    centre = min(coarse, key=coarse.get)
    fine = {i: coarse[i] if i in coarse else nlpd(i) for i in range(max(centre - stride + 1, 0), min(centre + stride, len(grid)))}
    best = min(fine, key=fine.get)
    return grid[best], fine[best]


def tune_mc(la, model: torch.nn.Module, split: Split, samples: int,
            grid: Sequence[float] = PRIOR_GRID) -> Tuned:
    """Prior precision and noise by the validation NLPD of Monte Carlo's own mixture predictive."""
    best: Tuned | None = None
    for index, prior in enumerate(grid):
        la.prior_precision = prior
        noise, score = best_mixture_noise(mc_outputs(model, la, split.x_val, samples), split.y_val)
        if best is None or score < best.val_nlpd:
            best = Tuned(prior, noise, score, index in (0, len(grid) - 1))
    return best


def glm(la, x: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """laplace-torch's GLM predictive mean and variance, ``chunk`` inputs at a time (its Jacobians are
    chunk x outputs x parameters floats)."""
    means, variances = zip(*(la(piece, pred_type="glm") for piece in torch.split(x, chunk)))
    mean = torch.cat(means)
    return mean, torch.cat(variances).reshape(mean.shape)


def evaluate_split(split: Split, hidden: int, steps: int, seed: int, repeats: int, clock: str = "cpu",
                   mc_samples: Sequence[int] = (100, 1000), structures: Sequence[str] = STRUCTURES,
                   tune: Callable[..., Tuned] = tune_split) -> dict:
    """Every method on one split: {"map": ..., structure: {"tuned": ..., method: {"nlpd", "rmse", "noise",
    "seconds"}}}.

    The posterior (its prior precision) is the one ``tune`` chose; each
    method's observation noise is tuned on the validation part for its own
    predictive. "MC-100 own" re-tunes the prior precision too, by Monte
    Carlo's validation NLPD: sampling at its best, on its own posterior.
    """
    model = train_map(split, hidden, steps, seed)
    with torch.no_grad():
        train_rmse = float((model(split.x_train) - split.y_train).pow(2).mean().sqrt())
    scale, result = split.y_scale, {"train_rmse": train_rmse * split.y_scale}

    def score(predict: Callable[[torch.Tensor], tuple]) -> dict:
        """Noise tuned on the validation part, then test NLPD and RMSE in original units."""
        with torch.no_grad():
            val, test = predict(split.x_val), predict(split.x_test)
        if val[0] == "mixture":
            noise, _ = best_mixture_noise(val[1], split.y_val)
            nlpd, mean = mixture_nlpd(test[1], noise, split.y_test), test[1].mean(0)
        else:
            noise, _ = best_noise(val[1], val[2], split.y_val)
            nlpd, mean = gaussian_nlpd(test[1], test[2] + noise ** 2, split.y_test), test[1]
        return {"nlpd": float(nlpd.mean()) + math.log(scale),
                "rmse": float((mean - split.y_test).pow(2).mean().sqrt()) * scale, "noise": noise * scale}

    for structure in structures:
        la = fit_laplace(model, split, structure, train_rmse)
        own = tune_mc(la, model, split, mc_samples[0])
        la.prior_precision = own.prior_precision
        own_scores = score(lambda x: ("mixture", mc_outputs(model, la, x, mc_samples[0])))
        tuned = tune(la, model, split, FX_VARIANTS[DEFAULT_FX])
        post = fxstream.from_laplace(la)
        predictors = {name: fxstream.streamline(model, post, likelihood="regression", backend="eager", **opts)
                      for name, opts in FX_VARIANTS.items()}
        methods: dict[str, Callable[[torch.Tensor], tuple]] = {
            "MAP": lambda x: ("gaussian", model(x), torch.zeros(len(x), 1, dtype=x.dtype)),
            **{f"MC-{s}": (lambda x, s=s: ("mixture", mc_outputs(model, la, x, s))) for s in mc_samples},
            "GLM": lambda x: ("gaussian", *glm(la, x)),
        }
        for name, predictor in predictors.items():
            methods[name] = lambda x, p=predictor: ("gaussian", *(lambda r: (r.mean, r.var))(p(x)))
        scores = {name: score(predict) for name, predict in methods.items()}
        scores[MC_OWN] = own_scores
        with torch.no_grad():
            seconds = median_seconds({name: (lambda f=f: f(split.x_test)) for name, f in methods.items()},
                                     repeats=repeats, clock=clock, warmup=1)
        for name, value in seconds.items():
            scores[name]["seconds"] = value
        scores[MC_OWN]["seconds"] = seconds[f"MC-{mc_samples[0]}"]
        result[structure] = {"tuned": {"prior_precision": tuned.prior_precision, "at_edge": tuned.at_edge,
                                       "mc_prior_precision": own.prior_precision, "mc_at_edge": own.at_edge},
                             **scores}
    return result


MC_OWN = "MC-100 own"
METHODS = ("MAP", "MC-100", "MC-1000", MC_OWN, "GLM", *FX_VARIANTS)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over splits (0 for a single split)."""
    values = list(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def _cell(values: Sequence[float], digits: int = 2) -> str:
    mean, se = mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _by_set(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["set"], []).append(record["result"])
    return {name: grouped[name] for name in SETS if name in grouped}


def _metric(results: list[dict], structure: str, method: str, key: str) -> list[float]:
    return [r[structure][method][key] for r in results if method in r.get(structure, {})]


def _digits(name: str) -> int:
    return 3 if name in ("kin8nm", "naval", "wine") else 2


def _available(name: str) -> int | str:
    """The set's number of canonical splits ("?" where the data folder is not here)."""
    folder = DATA / SETS[name][0]
    return n_splits(folder) if folder.exists() else "?"


def summary_table(records: list[dict]) -> tuple[str, str]:
    """The README table (NLPD of MAP, MC-100, GLM and fxstream's default per structure) and the target line."""
    rows, wins, ratios = [], {s: 0 for s in STRUCTURES}, {s: [] for s in STRUCTURES}
    grouped = _by_set(records)
    for name, results in grouped.items():
        d = _digits(name)
        row = [name, f"{len(results)}/{_available(name)}", f"{-SETS[name][1]:.2f}", _cell(_metric(results, STRUCTURES[0], "MAP", "nlpd"), d)]
        for structure in STRUCTURES:
            fx = _metric(results, structure, DEFAULT_FX, "nlpd")
            mc = _metric(results, structure, "MC-100", "nlpd")
            gap = [a - b for a, b in zip(fx, mc)]
            wins[structure] += statistics.fmean(fx) <= statistics.fmean(mc)
            ratios[structure] += [m / f for m, f in zip(_metric(results, structure, "MC-100", "seconds"),
                                                         _metric(results, structure, DEFAULT_FX, "seconds"))]
            row += [_cell(mc, d), _cell(_metric(results, structure, "GLM", "nlpd"), d), _cell(fx, d),
                    _cell(gap, 3)]
        rows.append(row)
    headers = ["set", "splits", "MC dropout, published (−LL)", "MAP"]
    for structure in STRUCTURES:
        headers += [f"{structure}: MC-100", f"{structure}: GLM", f"{structure}: fxstream",
                    f"{structure}: fxstream − MC-100"]
    target = "; ".join(
        f"{structure}: fxstream's NLPD <= MC-100's on {wins[structure]} of {len(grouped)} sets, "
        f"MC-100 takes {statistics.median(ratios[structure]):.1f}x fxstream's time (median over splits)"
        for structure in STRUCTURES if ratios[structure])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), target


def method_table(records: list[dict], structure: str, key: str) -> str:
    """Mean ± standard error of ``key`` (nlpd or rmse) over splits, every method, one structure."""
    methods = METHODS if key == "nlpd" else ("MAP", "MC-100", "MC-1000")
    rows = [[name, *(_cell(_metric(results, structure, m, key), _digits(name)) for m in methods)]
            for name, results in _by_set(records).items()]
    return tabulate(rows, headers=["set", *methods], tablefmt="github", disable_numparse=True)


def time_table(records: list[dict]) -> str:
    """Median prediction time over splits (ms, test set) of every method, and MC-100 over fxstream's default."""
    rows = []
    for name, results in _by_set(records).items():
        for structure in STRUCTURES:
            ms = {m: statistics.median(_metric(results, structure, m, "seconds")) * 1e3 for m in METHODS}
            rows.append([name, structure, *(f"{ms[m]:.3g}" for m in METHODS),
                         f"{ms['MC-100'] / ms[DEFAULT_FX]:.1f}x"])
    return tabulate(rows, headers=["set", "posterior", *METHODS, "MC-100 / fxstream"], tablefmt="github",
                    disable_numparse=True)


def tuned_table(records: list[dict]) -> str:
    """What validation tuning chose (medians over splits): prior precisions, how often at the grid's edge, noise."""
    rows = []
    for name, results in _by_set(records).items():
        row = [name]
        for structure in STRUCTURES:
            tuned = [r[structure]["tuned"] for r in results]
            row += [f"{statistics.median(t['prior_precision'] for t in tuned):.3g} "
                    f"({sum(t['at_edge'] for t in tuned)})",
                    f"{statistics.median(t['mc_prior_precision'] for t in tuned):.3g} "
                    f"({sum(t['mc_at_edge'] for t in tuned)})",
                    *(f"{statistics.median(_metric(results, structure, m, 'noise')):.3g}"
                      for m in ("MAP", DEFAULT_FX, "MC-100"))]
        rows.append(row)
    headers = ["set"]
    for structure in STRUCTURES:
        headers += [f"{structure}: prior precision (at edge)", f"{structure}: {MC_OWN} prior precision (at edge)",
                    f"{structure}: noise MAP", f"{structure}: noise fxstream", f"{structure}: noise MC-100"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def plot(records: list[dict], path: Path) -> None:
    """NLPD per set per method, mean ± standard error over splits, diag and kron side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = _by_set(records)
    columns = min(3, len(grouped))
    rows = math.ceil(len(grouped) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    positions = np.arange(len(METHODS))
    for ax, (name, results) in zip(axes.flat, grouped.items()):
        for offset, structure, colour in ((-0.18, "diag", "tab:blue"), (0.18, "kron", "tab:orange")):
            stats = [mean_se(_metric(results, structure, m, "nlpd")) for m in METHODS]
            ax.errorbar(positions + offset, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o",
                        color=colour, label=structure, capsize=2, markersize=4)
        ax.axhline(-SETS[name][1], color="grey", linestyle="--", linewidth=1, label="MC dropout (published)")
        ax.set_title(f"{name} ({len(results)} splits)")
        ax.set_xticks(positions, [m.replace("fxstream ", "fx ") for m in METHODS], rotation=60, ha="right",
                      fontsize=7)
        ax.set_ylabel("test NLPD")
    for ax in list(axes.flat)[len(grouped):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _command(argv: list[str]) -> str:
    """The command without the bookkeeping of a run in parts (--json FILE --resume)."""
    shown, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg == "--json":
            argv.pop(0)
        elif arg not in ("--resume", "--report-only"):
            shown.append(arg)
    return "python benchmarks/bench_uci.py " + shlex.join(shown)


def setting(args: argparse.Namespace, records: list[dict], minutes: float) -> str:
    import laplace

    return (f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {torch.get_num_threads()} "
            f"thread(s), Python {platform.python_version()}, torch {torch.__version__}, laplace-torch "
            f"{getattr(laplace, '__version__', '0.3')}, fxstream {fxstream.__version__}; {len(records)} splits, "
            f"{minutes:.0f} min of split time; {args.steps} Adam steps; times: {args.clock} clock, median of "
            f"{args.repeats} interleaved rounds")


README_BEGIN, README_END = "<!-- uci:begin -->", "<!-- uci:end -->"


def update_readme(path: Path, block: str) -> None:
    """Replace the text between the UCI markers of ``path`` with ``block``."""
    text = path.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {README_BEGIN} ... {README_END} block to replace")
    path.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{block}\n{README_END}", text))


PAGE_INTRO = """\
# UCI regression

Does the one-pass predictive hold its own against sampling? On the nine UCI
regression sets of the Bayesian deep learning literature, with their
canonical splits, a one-hidden-layer MLP gets a Laplace posterior over all its
weights (laplace-torch, diagonal and Kronecker-factored GGN), tuned on
validation data, and its test predictive is computed five ways from that one
posterior: Monte Carlo with 100 and 1000 weight draws, laplace-torch's
linearised (GLM) predictive, and fxstream's single pass under four option
sets. The MAP network is the baseline; the MC-dropout log-likelihoods of Gal &
Ghahramani (2016, "Dropout as a Bayesian Approximation", Table 1; a different
model and training protocol) are quoted as NLPD (their negative) for scale.
"""


READING = """\
## How to read it

- **Same posterior, different predictives.** GLM and fxstream
  `linearised/full` are the same quantity, the network linearised in all its
  weights, J Sigma J^T, so they agree to float rounding
  (`tests/test_bench_uci.py` checks it against laplace-torch). Under a
  diagonal posterior `linearised/diag` is that quantity too: each hidden
  unit's pre-activation has its own weights, so the hidden units stay
  independent and diagonal activations drop nothing.
- **Kron and diagonal activations.** A Kronecker posterior correlates the
  hidden units' pre-activations (the first layer's output factor). fxstream's
  default keeps one variance per activation and drops those correlations, so
  under kron its predictive variance is not the posterior's linearisation and
  can be several times GLM's; `activation_cov="full"` keeps them (50 or 100
  hidden units: a small covariance per sample).
- **moments vs linearised.** The paper's rule keeps the weight-variance x
  input-variance term of each product (exact first two moments of a linear
  layer with Gaussian weights and inputs); `products="linearised"` drops it.
- **Monte Carlo** samples the network itself (laplace-torch's "nn"
  predictive). With ReLU networks and a broad posterior this predictive is
  known to underfit (Immer et al., 2021, "Improving predictions of Bayesian
  neural nets via local linearization"), and the prior precision was tuned
  for fxstream's predictive, a home advantage; the `MC-100 own` column
  removes it by tuning the prior for Monte Carlo.
- **Time.** Every method runs eagerly on one CPU thread. fxstream's eager
  backend runs its lowered graph op by op through Dynamo's guards (a fixed
  cost of about half a millisecond: ten times the MAP network's call on
  these small MLPs), so on the smallest test sets (yacht: 31 points) a
  vectorised Monte Carlo over 100 draws costs only 1.3-2x as much; the ratio
  grows with the test set (naval 9x, protein 154x).
"""


def page(records: list[dict], command: str, settings: str, figure: str) -> str:
    summary, target = summary_table(records)
    grouped = _by_set(records)
    missing = [name for name in SETS if name not in grouped]
    partial = [f"{name} ({len(results)} of {_available(name)})" for name, results in grouped.items()
               if len(results) != _available(name)]
    if missing or partial:
        target += (f". Not in this run: {', '.join(missing) or 'none'}; sets with only some of their splits: "
                   f"{', '.join(partial) or 'none'}")
    protocol = __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    sections = [
        PAGE_INTRO,
        f"Produced by `{command}` ({settings}).",
        "## Protocol\n\n" + protocol,
        READING,
        "## Summary: test NLPD (original units, mean ± standard error over splits; lower is better)\n\n"
        + summary + f"\n\n{target}. The fxstream column is the default (`moments/diag`) predictive; "
        "fxstream − MC-100 is the mean over splits of the paired difference.",
        f"![test NLPD per set and method]({figure})",
    ]
    for structure in STRUCTURES:
        sections.append(f"## Test NLPD, {structure} posterior, every method\n\n" + method_table(records, structure,
                                                                                               "nlpd"))
    for structure in STRUCTURES:
        sections.append(f"## Test RMSE, {structure} posterior\n\nMAP, GLM and every fxstream option predict "
                        "with the MAP network's output (the posterior mean's forward), so they share one RMSE; "
                        "Monte Carlo averages the sampled networks.\n\n" + method_table(records, structure, "rmse"))
    sections.append("## Prediction time (ms for the test set; median over splits)\n\n" + time_table(records))
    sections.append("## What tuning chose (medians over splits; noise in original units)\n\n"
                    + tuned_table(records))
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"CI mode: sets {' '.join(QUICK['sets'])}, {QUICK['splits']} splits, 1000 steps, 2 repeats")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--splits", type=int, default=None, help="at most this many splits per set")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the nine sets")
    parser.add_argument("--steps", type=int, default=4000, help="Adam steps for the MAP network")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per split (median)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help=CLOCK_HELP)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the markdown page here (e.g. docs/uci.md), its plot beside")
    parser.add_argument("--readme", type=Path, help=f"replace the {README_BEGIN} block of this file with the summary")
    parser.add_argument("--json", type=Path, help="also write every split's result here, one JSON object a line")
    parser.add_argument("--resume", action="store_true", help="keep the splits already in --json, run the others")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the tables, page and plot from the splits of --sets already in --json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sets, limit, repeats = args.sets, args.splits, args.repeats
    if args.quick:
        sets, limit, repeats, args.steps = QUICK["sets"], QUICK["splits"], 2, 1000
    jobs = [(name, k) for name in sets for k in range(min(n_splits(args.data / SETS[name][0]), limit or 10**6))]
    done: dict[tuple[str, int], dict] = {}
    if args.report_only:
        if not (args.json and args.json.exists()):
            raise SystemExit("--report-only needs the --json file of a run")
        args.resume = True
    if args.resume and args.json and args.json.exists():
        for line in args.json.read_text().splitlines():
            record = json.loads(line)
            done[(record["set"], record["split"])] = record
    elif args.json:
        args.json.write_text("")
    records = []
    progress = tqdm(jobs, unit="split", dynamic_ncols=True)
    for name, k in progress:
        if (name, k) in done:
            records.append(done[(name, k)])
            continue
        if args.report_only:
            continue
        progress.set_description(f"{name} split {k}")
        # Every StreamlinedModel compiles the same code object; Dynamo's recompile limit (1024 per code
        # object, which fxstream.streamline raises to) would stop a run after about 100 splits.
        torch._dynamo.reset()
        start = time.perf_counter()
        split = load_split(args.data / SETS[name][0], k)
        result = evaluate_split(split, 100 if name == "protein" else 50, args.steps, seed=k, repeats=repeats,
                                clock=args.clock)
        record = {"set": name, "split": k, "seconds": time.perf_counter() - start, "result": result}
        records.append(record)
        if args.json:
            with args.json.open("a") as file:
                file.write(json.dumps(record) + "\n")
    minutes = sum(r["seconds"] for r in records) / 60
    command = _command(sys.argv[1:])
    parts = ", run in parts with `--json FILE --resume`" if args.resume else ""
    settings = setting(args, records, minutes) + parts
    summary, target = summary_table(records)
    print(f"Produced by `{command}` ({settings}).\n\n{summary}\n\n{target}.\n")
    for structure in STRUCTURES:
        print(f"{structure} NLPD\n\n{method_table(records, structure, 'nlpd')}\n")
    print(time_table(records))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure = args.out.with_name(args.out.stem + "_nlpd.png")
        plot(records, figure)
        args.out.write_text(page(records, command, settings, figure.name))
    if args.readme:
        update_readme(args.readme, f"Test NLPD on UCI regression (mean ± standard error over splits; "
                                   f"[docs/uci.md](docs/uci.md)), produced by `{command}`:\n\n{summary}\n\n{target}.")


if __name__ == "__main__":
    main()
