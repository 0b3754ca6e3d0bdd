"""Convolutions (1-D, 2-D, 3-D, grouped, depthwise, padding modes) and transposed convolutions: exact moments,
diag and full."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, param, randn

aten = torch.ops.aten
image = randn(2, 2, 5, 5, seed=1)
w, b = randn(3, 2, 3, 3, seed=2), randn(3, seed=3)
grouped_in, grouped_w = randn(2, 4, 4, 4, seed=4), randn(4, 2, 3, 3, seed=5)
depthwise_w = randn(4, 1, 3, 3, seed=6)
signal, w1 = randn(2, 2, 7, seed=7), randn(3, 2, 3, seed=8)
tiny, tiny_w = randn(1, 2, 3, 3, seed=11), randn(2, 2, 2, 2, seed=12)
volume, w3 = randn(1, 2, 3, 4, 4, seed=9), randn(2, 2, 2, 3, 3, seed=10)
up_w, up_w1, up_w3 = randn(2, 3, 3, 3, seed=13), randn(2, 3, 4, seed=14), randn(2, 2, 2, 2, 2, seed=15)
grouped_up_w = randn(4, 2, 2, 2, seed=16)

SAMPLES = [
    Sample(aten.conv2d.default, (act(tiny, 0.5), param(tiny_w, 0.5), param(b[:2]), [1, 1], [0, 0], [1, 1], 1),
           exact=True, monte_carlo=True, name="monte-carlo"),
    Sample(aten.conv2d.default, (act(image), param(w), param(b), [1, 1], [1, 1], [1, 1], 1),
           exact=True, name="all-uncertain"),
    Sample(aten.conv2d.default, (image, param(w), param(b), [2, 2], [0, 0], [1, 1], 1),
           exact=True, name="weights-only-strided"),
    Sample(aten.conv2d.default, (act(image), w, b, [1, 1], [1, 1], [2, 2], 1), exact=True, name="dilated-input"),
    Sample(aten.conv2d.default, (act(grouped_in), param(grouped_w), None, [1, 1], [1, 1], [1, 1], 2),
           exact=True, name="groups"),
    Sample(aten.conv2d.default, (act(grouped_in), param(depthwise_w), None, [1, 1], [0, 0], [1, 1], 4),
           exact=True, name="depthwise"),
    Sample(aten.conv1d.default, (act(signal), param(w1), param(b), [2], [1], [1], 1), exact=True),
    Sample(aten.conv3d.default, (act(volume), param(w3), None, [1, 1, 1], [0, 1, 1], [1, 1, 1], 1), exact=True),
    Sample(aten.conv1d.padding, (act(signal), param(w1), None, [1], "same", [1], 1), exact=True),
    Sample(aten.conv2d.padding, (act(image), param(w), param(b), [1, 1], "same", [1, 1], 1), exact=True),
    Sample(aten.conv3d.padding, (act(volume), param(w3), None, [1, 1, 1], "valid", [1, 1, 1], 1), exact=True),
    Sample(aten.conv_transpose2d.input, (act(tiny, 0.5), param(up_w[:, :2, :2, :2], 0.5), param(b[:2]), [2, 2]),
           structures=("diag",), exact=True, monte_carlo=True, name="monte-carlo"),
    Sample(aten.conv_transpose2d.input, (act(image), param(up_w), param(b), [2, 2], [1, 1], [1, 1], 1, [1, 1]),
           structures=("diag",), exact=True, name="all-uncertain-strided"),
    Sample(aten.conv_transpose2d.input, (image, param(up_w), None, [1, 1], [0, 0], [0, 0], 1, [2, 2]),
           structures=("diag",), exact=True, name="weights-only-dilated"),
    Sample(aten.conv_transpose2d.input, (act(grouped_in), param(grouped_up_w), param(randn(4, seed=17)), [2, 2],
                                         [0, 0], [1, 1], 2),
           structures=("diag",), exact=True, name="groups"),
    Sample(aten.conv_transpose2d.input, (act(image), up_w, b, [2, 2], [1, 1], [1, 1]), name="input-only"),
    Sample(aten.conv_transpose1d.default, (act(signal), param(up_w1), param(b), [2], [1], [1]),
           structures=("diag",), exact=True),
    Sample(aten.conv_transpose1d.default, (act(signal), up_w1, None, [3]), name="input-only"),
    Sample(aten.conv_transpose3d.input, (act(volume), param(up_w3), None, [2, 1, 2], [0, 1, 0]),
           structures=("diag",), exact=True),
    Sample(aten.conv_transpose3d.input, (act(volume), up_w3, b[:2], [1, 2, 1]), name="input-only"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def _problem(args, kinds):
    from fxstream.rules import RULES
    from fxstream.rules.registry import RuleCall

    op = aten.conv2d.default
    return RULES[op].supports(RuleCall(op, args, {}, kinds, {}, kinds, {}, None, "diag"))


@pytest.mark.parametrize("args, kinds, expected", [
    ((grouped_in, grouped_w, None, [1, 1], [1, 1], [1, 1], 2), ("diag", "param_kfac"), "groups=1 only"),
    ((image, w, b, [1, 1], [0, 0], [1, 1], 1), ("diag", "param_dense_affine", None), "jointly"),
    ((image, w, b, [1, 1], [0, 0], [1, 1], 1), ("diag", "diag"), "dynamic convolution"),
    ((image, w, b, [1, 1], [0, 0], [1, 1], 1), ("diag", None, "diag"), "after the convolution"),
])
def test_kernel_and_bias_posteriors_the_rule_cannot_combine_are_declined(args, kinds, expected: str) -> None:
    assert expected in _problem(args, kinds)


@pytest.mark.parametrize("kinds, structure, expected", [
    (("diag", "param_kfac"), "diag", "'param_kfac' posterior on the kernel"),
    (("diag", None, "param_dense"), "diag", "'param_dense' posterior on the bias"),
    (("full", "param_diag"), "full", "uncertain kernel with activation_cov='full'"),
    (("diag", "diag"), "diag", "kernel computed from the input"),
])
def test_transposed_convolution_declines_what_it_cannot_carry(kinds, structure: str, expected: str) -> None:
    from fxstream.rules import RULES
    from fxstream.rules.registry import RuleCall

    op = aten.conv_transpose2d.input
    call = RuleCall(op, (image, up_w, b), {}, kinds, {}, kinds, {}, None, structure)
    assert expected in RULES[op].supports(call)


def test_kernel_and_bias_posteriors_the_rule_handles_are_accepted() -> None:
    assert _problem((grouped_in, grouped_w, None, [1, 1], [1, 1], [1, 1], 2), ("diag", "param_diag")) is None
    assert _problem((image, w, b, [1, 1], [0, 0], [1, 1], 1),
                    ("diag", "param_lowrank_affine", "param_affine_bias")) is None
