"""Embedding lookups with a Bayesian table; repeated indices share (and so correlate) their rows."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, cases, check_sample, param, randn

aten = torch.ops.aten
table = randn(7, 3, seed=1)
tokens = torch.tensor([[1, 4, 1, 6], [0, 0, 2, 5]])
positions = torch.arange(4)

SAMPLES = [
    Sample(aten.embedding.default, (param(table), tokens), name="tokens"),
    Sample(aten.embedding.default, (param(table), positions), structures=("param_diag",), name="positions"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
