"""How much of the Monte Carlo gap ``residual="linearised"`` closes on small ResNets.

Two models, logits' variances on 64 inputs:

- a small ResNet trained briefly on scikit-learn's digits (8x8): stem conv, three
  torchvision ``BasicBlock`` s with identity skips (the joins the option covers),
  one downsampling block and one more identity block, average pool, linear head;
- torchvision's ResNet-18 with random weights on 32x32 inputs.

Two uncertainty sources, each alone: Gaussian input noise (deterministic weights),
and a diagonal weight posterior over every conv/linear weight (variance
``scale * mean(W^2)`` per layer). For each, the median relative error of the
logit variances of fxstream (diagonal activations, ``residual="paper"`` and
``"linearised"``) against Monte Carlo (the same posterior, sampled) and against
the exact linearisation J Sigma J^T (float64 autograd), which is what
the first-order rules approximate. Monte Carlo's own relative noise at S samples
is about sqrt(2 / S) (2.2% at 4000).

Run:  .venv/bin/python benchmarks/bench_cnn_residual.py --samples 2000 --out benchmarks/results/cnn_residual.md
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import fxstream

DTYPE = torch.float64


def small_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    width = 16
    down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width), BasicBlock(width, width), BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2, downsample=down), BasicBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def trained_small_resnet(epochs: int, seed: int) -> tuple[nn.Module, torch.Tensor, float]:
    from fxstream.demo import load_digits_split

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    model = small_resnet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return model.to(DTYPE), x_test[:64].to(DTYPE), accuracy


def random_resnet18(seed: int) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    for module in model.modules():  # running statistics away from the identity, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0, 0.2)
    return model.to(DTYPE).eval(), torch.randn(8, 3, 32, 32, dtype=DTYPE)


def weight_variances(model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    return {name: scale * p.detach().square().mean() * torch.ones_like(p)
            for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}


def monte_carlo(model: nn.Module, x: torch.Tensor, samples: int, variances: dict | None = None,
                input_var: float | None = None, chunk: int = 50) -> torch.Tensor:
    """Logit variances by sampling weights or inputs (float32 forward, centred on the mean network)."""
    model32, x32 = model.float(), x.float()
    params = {n: p.detach() for n, p in model32.named_parameters()}
    buffers = dict(model32.named_buffers())
    centre = model32(x32).detach()
    g = torch.Generator().manual_seed(7)
    total = square = 0
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        if variances is not None:
            drawn = {k: p + (variances[k].float().sqrt() * torch.randn(n, *p.shape, generator=g) if k in variances
                             else 0) for k, p in params.items()}
            drawn = {k: v if v.dim() > params[k].dim() else v.expand(n, *v.shape) for k, v in drawn.items()}
            with torch.no_grad():
                out = vmap(lambda d: functional_call(model32, {**d, **buffers}, (x32,)))(drawn)
        else:
            noisy = x32 + input_var ** 0.5 * torch.randn(n, *x32.shape, generator=g)
            with torch.no_grad():  # eval batch norm acts per sample: the draws are just more batch
                out = model32(noisy.flatten(0, 1)).reshape(n, *centre.shape)
        deviation = (out - centre).double()
        total, square = total + deviation.sum(0), square + deviation.square().sum(0)
    model.to(DTYPE)
    return square / samples - (total / samples).square()


def linearised(model: nn.Module, x: torch.Tensor, variances: dict | None = None,
               input_var: float | None = None) -> torch.Tensor:
    """Per-output diag(J Sigma J^T) in float64: sum over the uncertain entries of (d f_o / d theta)^2 var."""
    shape = model(x[:1]).shape[1:]
    if variances is None:
        jac = vmap(jacrev(lambda s: model(s[None])[0].reshape(-1)))(x)  # (B, outputs, *x)
        return (jac.flatten(2).square().sum(-1) * input_var).reshape(-1, *shape)
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for i in range(x.shape[0]):  # per sample: outputs x uncertain parameters
        jac = jacrev(lambda chosen: functional_call(model, {**params, **chosen}, (x[i:i + 1],)).reshape(-1))(
            {n: params[n] for n in variances})
        rows.append(sum((j.flatten(1).square() * variances[n].reshape(1, -1)).sum(-1) for n, j in jac.items()))
    return torch.stack(rows).reshape(-1, *shape)


def fxstream_var(model, x, residual: str, structure: str = "diag", variances=None, input_var=None) -> torch.Tensor:
    posterior = None if variances is None else fxstream.Diagonal(variances)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxstream.streamline(model, posterior, input_var=input_var, residual=residual, activation_cov=structure,
                                   backend="eager")(x).var


def _live(b: torch.Tensor) -> torch.Tensor:
    """Outputs with a reference variance (a relu feature that is off has none)."""
    return b > 1e-9 * b.max()


def median_error(a: torch.Tensor, b: torch.Tensor) -> float:
    live = _live(b)
    return ((a[live] - b[live]).abs() / b[live]).median().item()


def median_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    live = _live(b)
    return (a[live] / b[live]).median().item()


def rows_for(label: str, model, x, samples: int, setting: dict, variants) -> list[str]:
    mc = monte_carlo(model, x, samples, **setting)
    exact = linearised(model, x, **setting)
    out = [f"| {label} | J Sigma J^T (exact first order) | {median_error(exact, mc):.3f} | "
           f"{median_ratio(exact, mc):.3f} | 0 | 1 |"]
    for structure, residual in variants:
        var = fxstream_var(model, x, residual, structure, **setting)
        out.append(f"| {label} | fxstream {structure}, residual={residual} | {median_error(var, mc):.3f} | "
                   f"{median_ratio(var, mc):.3f} | {median_error(var, exact):.3f} | {median_ratio(var, exact):.3f} |")
    print("\n".join(out), flush=True)
    return out


DIAG = (("diag", "paper"), ("diag", "linearised"))
CASES = ("small", "small-features", "small-full", "resnet18")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--resnet18-samples", type=int, default=1000, help="Monte Carlo samples for ResNet-18")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.time()
    model, x, accuracy = trained_small_resnet(args.epochs, args.seed)
    lines = [f"Small ResNet on digits ({args.epochs} epochs, test accuracy {accuracy:.3f}), 64 test inputs; "
             f"ResNet-18 random weights, 32x32, 8 inputs. Monte Carlo: {args.samples} samples "
             f"({args.resnet18_samples} for ResNet-18). Medians over all outputs of the relative error "
             "|var - ref| / ref and of the ratio var / ref (outputs with a reference variance).", "",
             "| model, uncertainty | method | rel. error vs MC | ratio to MC | rel. error vs J Sigma J^T | "
             "ratio to J Sigma J^T |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    settings = (("input var 0.1", lambda m: {"input_var": 0.1}),
                ("weights 1e-2 W^2", lambda m: {"variances": weight_variances(m, 1e-2)}))
    if "small" in args.cases:
        for name, setting in settings:
            lines += rows_for(f"small ResNet logits, {name}", model, x, args.samples, setting(model), DIAG)
    if "small-features" in args.cases:  # per-position outputs of the three identity blocks: no pooling
        features = model[:6].eval()
        for name, setting in settings:
            lines += rows_for(f"small ResNet block-3 features, {name}", features, x[:16], args.samples,
                              setting(features), DIAG)
    if "small-full" in args.cases:  # full activations, input noise: exact first order but for the joins
        lines += rows_for("small ResNet logits (8 inputs), input var 0.1", model, x[:8], args.samples,
                          {"input_var": 0.1}, (("full", "paper"),) + DIAG)
    if "resnet18" in args.cases:
        model, x = random_resnet18(args.seed)
        for name, setting in settings:
            lines += rows_for(f"ResNet-18, {name}", model, x, args.resnet18_samples, setting(model), DIAG)
    lines += ["", f"({time.time() - started:.0f} s)"]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
