"""The pointwise fallback: ops tagged pointwise without a rule of their own, against the linearisation oracle."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, rand, randn

from fxstream.rules import RULES

aten = torch.ops.aten
x, y, z = randn(3, 4, seed=1), randn(3, 4, seed=2), rand(3, 4, seed=3)
unit = rand(3, 4, low=0.2, high=0.8, seed=4)  # inside (0, 1): logit, erfinv
row = randn(4, seed=5)

SAMPLES = [
    Sample(aten.lerp.Scalar, (act(x), act(y), 0.3)),
    Sample(aten.lerp.Tensor, (act(x), y, act(unit))),
    Sample(aten.celu.default, (act(x), 0.7)),
    Sample(aten.logit.default, (act(unit),)),
    Sample(aten.erfinv.default, (act(unit),)),
    Sample(aten.atan2.default, (act(x), act(z))),
    Sample(aten.hypot.default, (act(x), act(y))),
    Sample(aten.addcmul.default, (act(x), act(y), z), {"value": 0.5}),
    Sample(aten.addcdiv.default, (act(x), y, act(z)), {"value": 2.0}),
    Sample(aten.xlogy.Tensor, (act(x), act(z))),
    Sample(aten.sinh.default, (act(x),)),
    Sample(aten.softshrink.default, (act(x), 0.3)),
    Sample(aten.lerp.Scalar, (act(x), param(row), 0.25), name="parameter-end"),
]


def test_samples_exercise_the_fallback() -> None:
    assert not [s.op for s in SAMPLES if s.op in RULES], "a sampled op got a rule of its own: move its sample"


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
