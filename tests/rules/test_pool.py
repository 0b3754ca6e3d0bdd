"""Pooling: average pooling is linear (with padding, ceil mode, divisors); max pooling (fixed or adaptive windows)
routes the argmax."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, randn

aten = torch.ops.aten
signal, image, volume = randn(2, 2, 7, seed=1), randn(2, 2, 5, 5, seed=2), randn(1, 2, 4, 5, 5, seed=3)

SAMPLES = [
    Sample(aten.max_pool1d.default, (act(signal), [2], [2])),
    Sample(aten.max_pool1d.default, (act(randn(2, 3, 8, seed=4)), [2], []), name="tiled"),
    Sample(aten.max_pool2d.default, (act(randn(2, 3, 4, 6, seed=5)), [2, 3], [2, 3]), name="tiled"),
    Sample(aten.max_pool3d.default, (act(randn(1, 2, 4, 4, 4, seed=6)), [2, 2, 2]), name="tiled"),
    Sample(aten.max_pool2d.default, (act(image), [2, 2], [2, 2], [1, 1])),
    Sample(aten.max_pool2d.default, (act(image), [3, 3], [1, 1], [0, 0], [1, 1], True), name="overlap-ceil"),
    Sample(aten.max_pool2d.default, (act(randn(2, 2, 7, 6, seed=7)), [2, 3], [2, 1], [1, 1], [2, 1], True),
           name="dilated-padded-ceil"),
    Sample(aten.max_pool3d.default, (act(volume), [2, 2, 2], [2, 2, 2])),
    Sample(aten.avg_pool1d.default, (act(signal), [3], [2], [1], False, False), name="exclude-pad"),
    Sample(aten.avg_pool2d.default, (act(image), [2, 2], [2, 2])),
    Sample(aten.avg_pool2d.default, (act(image), [3, 3], [2, 2], [1, 1], True, False), name="ceil-exclude-pad"),
    Sample(aten.avg_pool2d.default, (act(image), [2, 2], [1, 1], [1, 1], False, True, 3), name="divisor"),
    Sample(aten.avg_pool3d.default, (act(volume), [2, 2, 2], [2, 2, 2], [1, 0, 1], False, False)),
    Sample(aten.adaptive_avg_pool1d.default, (act(signal), [3])),
    Sample(aten.adaptive_avg_pool2d.default, (act(image), [3, 2])),
    Sample(aten.adaptive_avg_pool2d.default, (act(image), [1, 1]), name="global"),
    Sample(aten.adaptive_avg_pool3d.default, (act(volume), [3, 2, 3])),
    Sample(aten.adaptive_max_pool1d.default, (act(signal), [3])),
    Sample(aten.adaptive_max_pool2d.default, (act(image), [2, 3])),
    Sample(aten.adaptive_max_pool2d.default, (act(image), [1, 1]), name="global"),
    Sample(aten.adaptive_max_pool3d.default, (act(volume), [2, 2, 3])),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)
