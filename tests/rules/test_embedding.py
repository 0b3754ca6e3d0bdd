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


def test_uncertain_indices_are_declined() -> None:
    """Integers carry no covariance; were indices to come with one, the rule says so instead of ignoring it."""
    from fxstream.rules import RULES
    from fxstream.rules.registry import RuleCall

    op = aten.embedding.default
    for kinds, declined in ((("param_diag", "diag"), True), (("param_diag", None), False)):
        problem = RULES[op].supports(RuleCall(op, (table, tokens), {}, kinds, {}, kinds, {}, None, "diag"))
        assert (problem is not None and "deterministic" in problem) == declined
