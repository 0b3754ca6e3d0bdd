"""Classification metrics for predictive probabilities: accuracy, NLPD, expected calibration error."""

from __future__ import annotations

import torch


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose most probable class is the target. ``probs``: (N, C)."""
    return (probs.argmax(-1) == targets).double().mean().item()


def nlpd(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log probability of the targets under ``probs`` (N, C)."""
    picked = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()
    return -torch.log(picked.clamp_min(torch.finfo(torch.float64).tiny)).mean().item()


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins.

    Each sample goes to the bin (lo, hi] holding its top probability; the ECE
    is the sample-weighted mean over bins of |accuracy - mean confidence|.
    """
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == targets).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - confidence)
    return (gap.abs().sum() / count.sum()).item()
