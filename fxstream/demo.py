"""``fxstream demo``: a Laplace-Bayesian MLP on sklearn's digits, fxstream against MAP and Monte Carlo.

Trains a small MLP on the 8x8 digits bundled with scikit-learn, fits a
diagonal Laplace posterior with laplace-torch (prior precision by grid search
on the validation NLL of laplace-torch's own GLM predictive, a fifth of the
training split held out), and prints accuracy, NLPD, ECE and prediction time on the test
split for the MAP network, Monte Carlo over 10 and 100 weight samples from the
same posterior, and fxstream's one-pass predictive (probit link).

fxstream's moment-matched linear layers keep the weight-variance x
input-variance terms, so its logit variances track Monte Carlo's even for a
broad posterior (the marginal-likelihood prior of laplace-torch gives a very
broad one here: every method's NLPD then degrades, MC-10's most); the
probabilities still differ where the softmax of the sampled logits is far from
the probit approximation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

HIDDEN = 128
CLASSES = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser("demo", help="MAP vs Monte Carlo vs fxstream on sklearn's digits",
                                   description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, training and sampling")
    parser.add_argument("--epochs", type=_positive, default=20, help="training epochs (default 20)")
    parser.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                        help="how fxstream runs its rewritten graph (default inductor)")
    parser.add_argument("--repeats", type=_positive, default=5, help="timed prediction runs per method (median)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (progress and notes go to stderr)")
    parser.set_defaults(run=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised (with training statistics) digits, split 70/30 stratified: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)  # leaves pixels that are constant in training unscaled
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def make_mlp(inputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def train(model: nn.Module, loader: torch.utils.data.DataLoader, epochs: int) -> None:
    """Adam on the cross entropy with weight decay (a Gaussian prior), a progress bar over epochs.

    The weight decay keeps the MAP network from saturating its softmax: a
    saturated network has a near-zero Hessian, and its Laplace posterior falls
    back to the (broad) prior.
    """
    from tqdm.auto import tqdm

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-3)
    model.train()
    bar = tqdm(range(epochs), desc="training", unit="epoch")
    for _ in bar:
        total = 0.0
        for x, y in loader:
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
        bar.set_postfix(loss=f"{total / len(loader.dataset):.3f}")
    model.eval()


def monte_carlo_probs(model: nn.Module, variances: dict[str, torch.Tensor], x: torch.Tensor, samples: int,
                      generator: torch.Generator, chunk: int = 10, progress: Any = None) -> torch.Tensor:
    """Mean softmax over ``samples`` weight draws theta ~ N(theta_MAP, diag(variances)).

    Draws ``chunk`` weight sets at a time and runs them with vmap over
    ``torch.func.functional_call``; parameters without a variance stay at the MAP.
    ``progress``, a tqdm bar, advances by the number of samples drawn.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    forward = torch.func.vmap(lambda theta: torch.func.functional_call(model, theta, (x,)).softmax(-1))
    total = 0
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        theta = {  # noise drawn on the generator's device, the same draws wherever the model runs
            name: p.expand(size, *p.shape) + (
                torch.randn(size, *p.shape, generator=generator, device=generator.device).to(p.device)
                * variances[name].sqrt() if name in variances else 0)
            for name, p in params.items()
        }
        total = total + forward(theta).sum(0)
        if progress is not None:
            progress.update(size)
    return total / samples


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """The result of the first call and the median wall time (seconds) over ``repeats`` calls
    (on a GPU, up to the end of the work each call queued)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _synchronize(out)
        times.append(time.perf_counter() - start)
        result = out if result is None else result
    return result, statistics.median(times)


def _synchronize(out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)


@dataclass
class Row:
    """One method's line of the demo table."""

    method: str
    accuracy: float
    nlpd: float
    ece: float
    predict_seconds: float
    compile_seconds: float = 0.0


def evaluate(seed: int, epochs: int, backend: str, repeats: int, device: str = "cpu",
             log: Callable[[str], None] = print) -> list[Row]:
    """Train, fit the posterior, predict the test split with every method; one Row per method.

    Everything runs on ``device``; ``log`` prints the notes between the steps.
    """
    from laplace import Laplace
    from tqdm.auto import tqdm

    import fxstream
    from fxstream.metrics import accuracy, ece, nlpd

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_digits_split(seed))
    held_out = len(x_train) // 5
    x_val, y_val, x_train, y_train = x_train[:held_out], y_train[:held_out], x_train[held_out:], y_train[held_out:]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_val, y_val), batch_size=256)
    model = make_mlp(x_train.shape[1]).to(device)
    train(model, loader, epochs)

    log("fitting a diagonal Laplace posterior (laplace-torch), prior precision by grid search on a validation split")
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    with warnings.catch_warnings():  # laplace-torch always warns that its default link is probit
        warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
        la.optimize_prior_precision(method="gridsearch", pred_type="glm", link_approx="probit",
                                    val_loader=val_loader, progress_bar=False)
    posterior = fxstream.from_laplace(la)
    precisions = ", ".join(f"{p:.3g}" for p in la.prior_precision.tolist())
    log(f"posterior: {posterior}; prior precision per parameter tensor: {precisions}")

    def row(method: str, probs: torch.Tensor, seconds: float, compile_seconds: float = 0.0) -> Row:
        probs, targets = probs.cpu(), y_test.cpu()
        return Row(method, accuracy(probs, targets), nlpd(probs, targets), ece(probs, targets), seconds,
                   compile_seconds)

    rows = []
    with torch.no_grad():
        rows.append(row("MAP", *timed(lambda: model(x_test).softmax(-1), repeats)))
        for samples in (10, 100):
            generator = torch.Generator().manual_seed(seed)
            with tqdm(total=samples * repeats, desc=f"MC-{samples}", unit="sample") as bar:
                rows.append(row(f"MC-{samples}", *timed(lambda: monte_carlo_probs(
                    model, posterior.variances, x_test, samples, generator, progress=bar), repeats)))

    log(f"streamlining the model (backend={backend}); the first call captures and compiles it")
    streamlined = fxstream.streamline(model, posterior, likelihood="classification", backend=backend)
    start = time.perf_counter()
    _synchronize(streamlined(x_test).var)
    compile_seconds = time.perf_counter() - start
    probs, seconds = timed(lambda: streamlined(x_test).probs("probit"), repeats)
    rows.append(row(f"fxstream ({backend}, probit)", probs, seconds, compile_seconds))
    return rows


def run(args: argparse.Namespace) -> int:
    """``fxstream demo``: evaluate every method and print the table (or JSON)."""
    from tabulate import tabulate

    device = getattr(args, "device", "cpu")
    log = (lambda text: print(text, file=sys.stderr)) if args.json else print
    rows = evaluate(args.seed, args.epochs, args.backend, args.repeats, device=device, log=log)
    setting = (f"digits, 30% stratified test split; MLP 64-{HIDDEN}-{HIDDEN}-{CLASSES}; seed {args.seed}; "
               f"prediction time: median of {args.repeats} runs")
    if args.json:
        print(json.dumps({"setting": setting, "seed": args.seed, "epochs": args.epochs, "backend": args.backend,
                          "device": device, "repeats": args.repeats, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    table = [(r.method, r.accuracy, r.nlpd, r.ece, 1e3 * r.predict_seconds, r.compile_seconds) for r in rows]
    print()
    print(setting)
    print(tabulate(table, headers=("method", "accuracy", "NLPD", "ECE (15 bins)", "predict (ms)", "compile (s)"),
                   floatfmt=(None, ".4f", ".4f", ".4f", ".2f", ".1f")))
    return 0
