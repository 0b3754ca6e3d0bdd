"""Elementwise nonlinearities and identity ops against the linearisation oracle."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
x = randn(3, 4, seed=1)
positive = rand(3, 4, low=0.5, high=2.0, seed=2)
bounds = randn(4, seed=3)  # a per-feature lower bound
maps = randn(2, 3, 2, 2, seed=4)

SAMPLES = [
    Sample(aten.relu.default, (act(x),)),
    Sample(aten.gelu.default, (act(x),), name="erf"),
    Sample(aten.gelu.default, (act(x),), {"approximate": "tanh"}, name="tanh"),
    Sample(aten.silu.default, (act(x),)),
    Sample(aten.tanh.default, (act(x),)),
    Sample(aten.sigmoid.default, (act(x),)),
    Sample(aten.softplus.default, (act(x), 2.0, 1.0)),
    Sample(aten.elu.default, (act(x), 0.7)),
    Sample(aten.leaky_relu.default, (act(x), 0.1)),
    Sample(aten.hardtanh.default, (act(x), -0.5, 0.5)),
    Sample(aten.relu6.default, (act(3 * x),)),
    Sample(aten.exp.default, (act(x),)),
    Sample(aten.log.default, (act(positive),)),
    Sample(aten.sqrt.default, (act(positive),)),
    Sample(aten.rsqrt.default, (act(positive),)),
    Sample(aten.square.default, (act(x),)),
    Sample(aten.pow.Tensor_Scalar, (act(x), 3)),
    Sample(aten.abs.default, (act(x),)),
    Sample(aten.log_sigmoid.default, (act(x),)),
    Sample(aten.hardswish.default, (act(4 * x),)),
    Sample(aten.hardsigmoid.default, (act(4 * x),)),
    Sample(aten.mish.default, (act(x),)),
    Sample(aten.clamp.default, (act(x), -0.5, 0.5)),
    Sample(aten.clamp.default, (act(x), None, 0.3), name="max-only"),
    Sample(aten.clamp.Tensor, (act(x), bounds, None)),
    Sample(aten.clamp_min.default, (act(x), 0.2)),
    Sample(aten.clamp_max.default, (act(x), -0.2)),
    Sample(aten.reciprocal.default, (act(positive),)),
    Sample(aten.erf.default, (act(x),)),
    Sample(aten.sin.default, (act(x),)),
    Sample(aten.cos.default, (act(x),)),
    Sample(aten.log1p.default, (act(positive),)),
    Sample(aten.expm1.default, (act(x),)),
    Sample(aten.exp.default, (param(x),), structures=("param_diag",), name="param"),
    Sample(aten.hardswish.default, (param(4 * x),), structures=("param_diag",), name="param"),
    Sample(aten.dropout.default, (act(x), 0.5, False)),
    Sample(aten.clone.default, (act(x),)),
    Sample(aten.contiguous.default, (act(x),)),
    Sample(aten.alias.default, (act(x),)),
    Sample(aten.to.dtype, (act(x), torch.float32)),
    Sample(aten.to.dtype_layout, (act(x),), {"dtype": torch.float32, "device": torch.device("cpu")}),
    Sample(aten._to_copy.default, (act(x),), {"dtype": torch.float32}),
    Sample(aten.to.device, (act(x), torch.device("cpu"), torch.float32)),
    Sample(aten.to.other, (act(x), torch.zeros(1, dtype=torch.float32))),
    Sample(aten._to_copy.default, (act(x),), {"dtype": torch.float32}),
    Sample(aten._to_copy.default, (act(maps),), {"memory_format": torch.channels_last}, name="layout"),
    Sample(aten.type_as.default, (act(x), torch.zeros(1, dtype=torch.float32))),
    Sample(aten.type_as.default, (act(x), act(positive)), reference=lambda a, b: aten.type_as.default(a, b.detach()),
           name="both-uncertain"),
    Sample(aten.type_as.default, (x, act(positive)), reference=lambda a, b: aten.type_as.default(a, b.detach()),
           name="only-dtype-uncertain"),
    Sample(aten.detach.default, (act(x),), reference=aten.alias.default),
    Sample(aten.clone.default, (param(x),), structures=("param_diag",), name="param"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_dropout_in_training_mode_is_rejected() -> None:
    assert "model.eval" in capability_problem(Sample(aten.dropout.default, (act(x), 0.5, True)))


def test_clamp_with_uncertain_bounds_is_declined() -> None:
    problem = capability_problem(Sample(aten.clamp.Tensor, (act(x), act(bounds.expand(3, 4)), None)))
    assert "bounds" in problem and "deterministic" in problem
    assert capability_problem(Sample(aten.clamp.Tensor, (act(x), bounds, None))) is None
