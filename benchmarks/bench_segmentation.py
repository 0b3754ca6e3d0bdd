"""Per-pixel uncertainty of segmentation models: the ``interpolation`` option against Monte Carlo.

A segmentation head predicts logits on a coarse grid and upsamples them
bilinearly to the input's size. Neighbouring logits are computed with shared
weights from overlapping receptive fields, so they are strongly correlated,
which diagonal activations do not record. ``interpolation="correlated"`` (the
default) interpolates standard deviations, exact for perfectly correlated
positions; ``"independent"`` gives var = (A o A) v, exact for independent ones.

Models (float64, eval mode):

- a small segmenter trained here on synthetic smooth fields (32x32, three
  classes by thresholds, noise added): three convolutions to stride 4, a 1x1
  classifier, bilinear upsampling 4x;
- torchvision's FCN-ResNet50, DeepLabV3-MobileNetV3 and LR-ASPP-MobileNetV3
  with random weights on a 64x64 input (upsampling 8x).

Posteriors: diagonal, standard deviation ``--rel-std`` times |w| (plus a small
floor), over the classifier ("last layer": the last two parameters) or every
parameter ("all", models under 12M parameters). For each, the median and 90th
percentile over output pixels of |var - var_MC| / var_MC against Monte Carlo
over the same posterior (the model run on sampled weights), and for the trained
segmenter also against the linearised network sampled the same way (J Sigma J^T,
what first-order rules approximate). A Monte Carlo variance from N draws has a
relative standard error of sqrt(2 / (N - 1)). ``call / forward``: a streamlined
call's time over the model's own forward (eager, CPU time, median of ``--repeats`` interleaved rounds
after 2 warm-up rounds).

Run:  .venv/bin/python benchmarks/bench_segmentation.py --out benchmarks/results/segmentation.md --figure docs/segmentation.png
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fxstream
from fxstream.timing import median_seconds
from fxstream.zoo import LinearisedMonteCarlo, MonteCarlo, relative_errors, relative_posterior, select_output

DTYPE = torch.float64
OPTIONS = ("correlated", "independent")


class SmallSegmenter(nn.Module):
    """Three convolutions to stride 4, a 1x1 classifier, bilinear upsampling to the input's size."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(32, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def smooth_fields(n: int, generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images: a smooth random field plus noise; labels: the field below -0.5, between, above 0.5."""
    coarse = torch.randn(n, 1, size // 4, size // 4, generator=generator)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    images = field + 0.3 * torch.randn(field.shape, generator=generator)
    return images, torch.bucketize(field[:, 0], torch.tensor([-0.5, 0.5]))


def trained_segmenter(steps: int, seed: int) -> tuple[nn.Module, torch.Tensor, float]:
    """The small segmenter after ``steps`` Adam steps of 64 fields; a held-out batch of 4 and its pixel accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SmallSegmenter()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        images, labels = smooth_fields(64, generator)
        loss = F.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model = model.eval().to(DTYPE)
    images, labels = smooth_fields(4, generator)
    with torch.no_grad():
        accuracy = (model(images.to(DTYPE)).argmax(1) == labels).double().mean().item()
    return model, images.to(DTYPE), accuracy


def torchvision_segmenter(name: str) -> tuple[nn.Module, torch.Tensor]:
    fxstream.make_torchvision_importable()
    from torchvision.models import segmentation

    torch.manual_seed(0)
    builder = getattr(segmentation, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = builder(weights=None, weights_backbone=None, num_classes=5, aux_loss=None)
    return model.eval().to(DTYPE), torch.randn(1, 3, 64, 64, dtype=DTYPE)


def sampled_variance(kind: type[MonteCarlo], model: nn.Module, x: torch.Tensor, posterior, samples: int,
                     output: str | None) -> torch.Tensor:
    sampler = kind(model, (x,), {}, posterior.variances, output=output)
    sampler.run(samples)
    return sampler.variance()


def evaluate(label: str, model: nn.Module, x: torch.Tensor, output: str | None, posteriors: dict, samples: int,
             linearised: bool, repeats: int) -> tuple[list[list], dict]:
    """Table rows for every posterior and option; the variance maps of the first posterior, for the figure."""
    rows, maps = [], {}
    for which, posterior in posteriors.items():
        reference = sampled_variance(MonteCarlo, model, x, posterior, samples, output)
        glm = sampled_variance(LinearisedMonteCarlo, model, x, posterior, samples, output) if linearised else None
        maps.setdefault("Monte Carlo", reference)
        streamlined = {option: fxstream.streamline(model, posterior, backend="eager", output=output,
                                                   interpolation=option) for option in OPTIONS}
        with torch.no_grad():
            calls = {"forward": lambda: select_output(model(x), output)}
            calls.update({option: (lambda s=s: s(x)) for option, s in streamlined.items()})
            seconds = median_seconds(calls, repeats, "cpu")
            for option, predict in streamlined.items():
                var = predict(x).var
                maps.setdefault(option, var)
                rows.append([label, which, option, "%.3f / %.3f" % relative_errors(var, reference),
                             "%.3f / %.3f" % relative_errors(var, glm) if linearised else "-",
                             f"{seconds[option] / seconds['forward']:.2f}x"])
    return rows, maps


def figure(path: str, image: torch.Tensor, maps: dict) -> None:
    """Input and the standard deviation of class 0's logit: Monte Carlo and both options, one color scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("input", image[0, 0])] + [(f"sd, {name}", maps[name][0, 0].sqrt()) for name in
                                         ("Monte Carlo", *OPTIONS)]
    top = max(p.max().item() for name, p in panels[1:])
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for ax, (name, values) in zip(axes, panels):
        shown = ax.imshow(values.float(), cmap="gray" if name == "input" else "magma",
                          vmin=None if name == "input" else 0, vmax=None if name == "input" else top)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1:].tolist(), shrink=0.8)
    fig.suptitle("Logit standard deviation of a segmenter, last-layer posterior")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="Monte Carlo draws for the trained segmenter")
    parser.add_argument("--torchvision-samples", type=int, default=400, help="Monte Carlo draws, torchvision models")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the small segmenter")
    parser.add_argument("--rel-std", type=float, default=0.05)
    parser.add_argument("--torchvision", nargs="*", default=["lraspp_mobilenet_v3_large",
                                                              "deeplabv3_mobilenet_v3_large", "fcn_resnet50"])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--figure", default=None, help="save the standard-deviation maps here (needs matplotlib)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate

    model, images, accuracy = trained_segmenter(args.steps, seed=0)
    last = relative_posterior(model, ["classifier.weight", "classifier.bias"], rel_std=args.rel_std)
    posteriors = {"last layer": last, "all": relative_posterior(model, rel_std=args.rel_std)}
    rows, maps = evaluate(f"small segmenter, trained (pixel accuracy {accuracy:.2f})", model, images, None,
                          posteriors, args.samples, linearised=True, repeats=args.repeats)
    if args.figure:
        figure(args.figure, images, maps)
    for name in args.torchvision:
        model, x = torchvision_segmenter(name)
        names = [n for n, _ in model.named_parameters()][-2:]
        posteriors = {"last layer": relative_posterior(model, names, rel_std=args.rel_std)}
        if sum(p.numel() for p in model.parameters()) < 12e6:
            posteriors["all"] = relative_posterior(model, rel_std=args.rel_std)
        more, _ = evaluate(f"torchvision {name}, random weights", model, x, "out", posteriors,
                           args.torchvision_samples, linearised=False, repeats=args.repeats)
        rows += more
    headers = ["model", "posterior", "interpolation", "vs Monte Carlo: median / p90",
               "vs linearised MC: median / p90", "call / forward"]
    table = tabulate(rows, headers, tablefmt="github")
    header = (f"# Segmentation: interpolation option against Monte Carlo\n\nGenerated by `python "
              f"benchmarks/bench_segmentation.py --out benchmarks/results/segmentation.md --figure "
              f"docs/segmentation.png` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"float64, eager, call / forward by CPU time over {args.repeats} interleaved rounds; Monte Carlo {args.samples} draws for the small segmenter, relative standard "
              f"error {(2 / (args.samples - 1)) ** 0.5:.3f}; {args.torchvision_samples} for torchvision's, "
              f"{(2 / (args.torchvision_samples - 1)) ** 0.5:.3f}; posterior sd {args.rel_std} |w|).\n\n")
    print(header + table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(header + table + "\n")


if __name__ == "__main__":
    main()
