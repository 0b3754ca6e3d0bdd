"""softmax and log_softmax, linearised at the mean."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, randn

aten = torch.ops.aten
logits, scores = randn(3, 5, seed=1), randn(2, 3, 4, seed=2)

SAMPLES = [
    Sample(aten.softmax.int, (act(logits), -1)),
    Sample(aten.softmax.int, (act(scores), 1), name="middle-dim"),
    Sample(aten._softmax.default, (act(scores), -1, False)),
    Sample(aten.log_softmax.int, (act(logits), 1)),
    Sample(aten._log_softmax.default, (act(scores), 2, False)),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
