"""Metrics of predictive quality: accuracy, NLPD, ECE, Brier score and OOD AUROC.

Each takes tensors on any device and returns a Python float, computed in float64.
``probs`` are class probabilities (N, C) (e.g. ``Predictive.probs()``), ``targets`` class indices (N,).
"""

from __future__ import annotations

import torch

from .errors import FxstreamError


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose most probable class is the target."""
    return (probs.argmax(-1) == targets.to(probs.device)).double().mean().item()


def nlpd(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log probability of the targets under ``probs``."""
    picked = probs.gather(-1, targets.to(probs.device).long().unsqueeze(-1)).squeeze(-1).double()
    return -torch.log(picked.clamp_min(torch.finfo(torch.float64).tiny)).mean().item()


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> tuple[torch.Tensor, ...]:
    """(count, mean confidence, accuracy) per equal-width confidence bin (lo, hi] of the top probability
    (0 in an empty bin)."""
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == targets.to(probs.device)).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    zeros = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(confidence))
    mean_confidence = zeros.index_add(0, index, confidence) / count.clamp_min(1)
    mean_correct = zeros.index_add(0, index, correct) / count.clamp_min(1)
    return count, mean_confidence, mean_correct


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: the sample-weighted mean over ``bins`` equal-width confidence bins
    (lo, hi] of |accuracy - mean confidence|."""
    count, confidence, correct = calibration_bins(probs, targets, bins)
    return ((count * (correct - confidence).abs()).sum() / count.sum()).item()


def brier(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over samples of the squared distance between ``probs`` and the one-hot target (sum over classes)."""
    one_hot = torch.nn.functional.one_hot(targets.to(probs.device).long(), probs.shape[-1]).double()
    return ((probs.double() - one_hot) ** 2).sum(-1).mean().item()


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling out-of-distribution samples from in-distribution ones by a
    score that should be higher out of distribution (e.g. predictive entropy or mutual information).

    The Mann-Whitney statistic: P(score_out > score_in) + 1/2 P(score_out = score_in), from
    tie-averaged ranks (O((N + M) log(N + M))).
    """
    score_in, score_out = score_in.reshape(-1).double(), score_out.reshape(-1).double().to(score_in.device)
    n_in, n_out = score_in.numel(), score_out.numel()
    if n_in == 0 or n_out == 0:
        raise FxstreamError("ood_auroc needs at least one in-distribution and one out-of-distribution score")
    scores = torch.cat([score_in, score_out])
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks, ties get their mean rank
    rank_out = average_rank[inverse[n_in:]].sum()
    return ((rank_out - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()
