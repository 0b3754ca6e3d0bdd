"""Elementwise nonlinearities and identity ops against the linearisation oracle."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, rand, randn

aten = torch.ops.aten
x = randn(3, 4, seed=1)
positive = rand(3, 4, low=0.5, high=2.0, seed=2)

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
    Sample(aten.hardswish.default, (act(3 * x),)),
    Sample(aten.hardsigmoid.default, (act(3 * x),)),
    Sample(aten.mish.default, (act(x),)),
    Sample(aten.exp.default, (act(x),)),
    Sample(aten.log.default, (act(positive),)),
    Sample(aten.sqrt.default, (act(positive),)),
    Sample(aten.rsqrt.default, (act(positive),)),
    Sample(aten.square.default, (act(x),)),
    Sample(aten.pow.Tensor_Scalar, (act(x), 3)),
    Sample(aten.abs.default, (act(x),)),
    Sample(aten.exp.default, (param(x),), structures=("param_diag",), name="param"),
    Sample(aten.dropout.default, (act(x), 0.5, False)),
    Sample(aten.clone.default, (act(x),)),
    Sample(aten.contiguous.default, (act(x),)),
    Sample(aten.alias.default, (act(x),)),
    Sample(aten.to.dtype, (act(x), torch.float32)),
    Sample(aten.to.dtype_layout, (act(x),), {"dtype": torch.float32, "device": torch.device("cpu")}),
    Sample(aten.to.device, (act(x), torch.device("cpu"), torch.float32)),
    Sample(aten.detach.default, (act(x),), reference=aten.alias.default),
    Sample(aten.clone.default, (param(x),), structures=("param_diag",), name="param"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_dropout_in_training_mode_is_rejected() -> None:
    assert "model.eval" in capability_problem(Sample(aten.dropout.default, (act(x), 0.5, True)))
