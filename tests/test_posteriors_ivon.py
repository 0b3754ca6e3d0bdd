"""IVON's posterior through fxstream.from_ivon, against IVON's own sampler (sampled_params)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream

ivon = pytest.importorskip("ivon", reason="ivon-opt is an optional extra (requirements/extras.txt)")


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    # Very different weight decays per group (variance 1 / (ess (hess + wd)), hess ~ 0.5): reading one group's
    # decay for the other would change those variances ~10x.
    groups = [{"params": model[0].parameters(), "weight_decay": 1e-4},
              {"params": model[2].parameters(), "weight_decay": 5.0}]
    optimizer = ivon.IVON(groups, lr=0.05, ess=2000.0, hess_init=0.5)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    for _ in range(20):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()
    return model.eval(), optimizer, x[:8]


def test_variances_match_ivon_samples():
    model, optimizer, _ = trained()
    posterior = fxstream.from_ivon(optimizer, model)
    assert sorted(posterior.parameter_names()) == sorted(n for n, _ in model.named_parameters())
    torch.manual_seed(1)
    draws = {n: [] for n, _ in model.named_parameters()}
    for _ in range(2000):
        with optimizer.sampled_params():
            for n, p in model.named_parameters():
                draws[n].append(p.detach().clone())
    # A sample variance of n Gaussian draws has relative standard error sqrt(2 / (n - 1)): every entry within five
    # of them, and each group's mean ratio within five standard errors of its mean.
    se = (2 / (2000 - 1)) ** 0.5
    for group, layer in ((0, "0"), (1, "2")):
        ratio = torch.cat([(torch.stack(values).var(0) / posterior.variances[name]).flatten()
                           for name, values in draws.items() if name.startswith(layer + ".")])
        assert (ratio - 1).abs().max().item() < 5 * se, f"group {group}: {ratio}"
        assert abs(ratio.mean().item() - 1) < 5 * se / ratio.numel() ** 0.5, f"group {group}: {ratio.mean()}"


def test_predictive_matches_monte_carlo_over_ivon_samples():
    model, optimizer, x = trained()
    pred = fxstream.streamline(model, fxstream.from_ivon(optimizer, model), activation_cov="full", backend="eager")(x)
    torch.manual_seed(2)
    outputs = []
    with torch.no_grad():
        for _ in range(8000):
            with optimizer.sampled_params():
                outputs.append(model(x))
    mc_var = torch.stack(outputs).var(0)
    gap = ((pred.var - mc_var).abs() / mc_var).median().item()
    assert gap < 0.03, f"median relative variance gap {gap:.3f}"


def test_names_needed():
    _, optimizer, _ = trained()
    with pytest.raises(fxstream.PosteriorMismatchError, match="pass the model"):
        fxstream.from_ivon(optimizer)
