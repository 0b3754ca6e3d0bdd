"""Plots of predictive quality; matplotlib is the optional extra ``fxstream[plot]``."""

from __future__ import annotations

import os

import torch

from .errors import FxstreamError
from .metrics import calibration_bins


def reliability_diagram(probs: torch.Tensor, targets: torch.Tensor, path: str | os.PathLike, *, bins: int = 15,
                        title: str | None = None) -> None:
    """Write a reliability diagram of ``probs`` (N, C) against ``targets`` (N,) as a PNG at ``path``.

    Bars: the accuracy in each of ``bins`` equal-width confidence bins (the bins of
    :func:`fxstream.metrics.ece`, whose value the title quotes); the diagonal is perfect calibration.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FxstreamError("fxstream.plot needs matplotlib, the optional extra fxstream[plot]: "
                            "pip install 'fxstream[plot]' (or pip install matplotlib)") from None
    count, confidence, accuracy = (t.cpu() for t in calibration_bins(probs, targets, bins))
    ece = float((count * (accuracy - confidence).abs()).sum() / count.sum())
    edges = torch.linspace(0, 1, bins + 1)
    figure, axis = plt.subplots(figsize=(4, 4), dpi=120)
    filled = count > 0
    axis.bar(edges[:-1][filled], accuracy[filled], width=1 / bins, align="edge", edgecolor="black",
             label="accuracy")
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", label="calibrated")
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(f"{title + ': ' if title else ''}ECE {ece:.3f}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    plt.close(figure)
