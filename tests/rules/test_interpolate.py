"""Resampling: (bi/tri)linear and bicubic interpolation, antialiased or not, as products of per-dim matrices;
nearest modes route one input per output.

The harness checks ``interpolation="independent"`` (diag(J diag(v) J^T)) and full covariance (J S J^T); the
default ``"correlated"`` is checked against diag(J S J^T) with S = sd sd^T within each map (every position of a
map perfectly correlated, maps independent), J from ``torch.func.jacrev`` of the op.
"""

from __future__ import annotations

import pytest
import torch

from torch.func import jacrev

from harness import Prepared, Sample, act, cases, check_sample, randn

from fxstream.rules.interpolate import INTERPOLATIONS

aten = torch.ops.aten
signal, image, volume = randn(2, 2, 5, seed=1), randn(2, 2, 4, 5, seed=2), randn(1, 2, 3, 4, 3, seed=3)

SAMPLES = [
    Sample(aten.upsample_linear1d.default, (act(signal), [9], False)),
    Sample(aten.upsample_linear1d.vec, (act(signal), None, True, [1.7]), name="scale-align"),
    Sample(aten.upsample_bilinear2d.default, (act(image), [7, 9], True)),
    Sample(aten.upsample_bilinear2d.default, (act(image), [8, 10], False, 2.0, 2.0), name="scales"),
    Sample(aten.upsample_bilinear2d.vec, (act(image), None, False, [2.0, 1.5]), name="scale-factors"),
    Sample(aten.upsample_bilinear2d.vec, (act(image), [3, 2], False, None), name="down"),
    Sample(aten.upsample_trilinear3d.default, (act(volume), [5, 6, 4], False)),
    Sample(aten.upsample_trilinear3d.vec, (act(volume), None, True, [2.0, 1.0, 1.5]), name="scale-align"),
    Sample(aten.upsample_bicubic2d.default, (act(image), [7, 9], False)),
    Sample(aten.upsample_bicubic2d.vec, (act(image), None, True, [1.5, 2.0]), name="scale-align"),
    Sample(aten._upsample_bilinear2d_aa.default, (act(randn(2, 2, 9, 7, seed=4)), [4, 3], False)),
    Sample(aten._upsample_bilinear2d_aa.vec, (act(randn(2, 2, 9, 7, seed=4)), None, False, [0.4, 0.5]),
           name="scale-factors"),
    Sample(aten._upsample_bicubic2d_aa.default, (act(randn(2, 2, 9, 7, seed=4)), [4, 5], True)),
    Sample(aten._upsample_bicubic2d_aa.vec, (act(randn(2, 2, 9, 7, seed=4)), [4, 5], False, None)),
    Sample(aten.upsample_nearest1d.default, (act(signal), [8])),
    Sample(aten.upsample_nearest1d.vec, (act(signal), None, [2.0])),
    Sample(aten.upsample_nearest2d.default, (act(image), [6, 7])),
    Sample(aten.upsample_nearest2d.vec, (act(image), None, [2.0, 2.0])),
    Sample(aten.upsample_nearest3d.default, (act(volume), [4, 6, 5])),
    Sample(aten.upsample_nearest3d.vec, (act(volume), None, [2.0, 1.0, 2.0])),
    Sample(aten._upsample_nearest_exact1d.default, (act(signal), [7])),
    Sample(aten._upsample_nearest_exact1d.vec, (act(signal), None, [1.5])),
    Sample(aten._upsample_nearest_exact2d.default, (act(image), [6, 7])),
    Sample(aten._upsample_nearest_exact2d.vec, (act(image), None, [1.5, 2.0])),
    Sample(aten._upsample_nearest_exact3d.default, (act(volume), [4, 6, 5])),
    Sample(aten._upsample_nearest_exact3d.vec, (act(volume), [2, 2, 2], None), name="down"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure, options={"interpolation": "independent"})


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.op.overloadpacket in INTERPOLATIONS], ids=lambda s: s.id)
def test_correlated_positions(sample: Sample) -> None:
    prepared = Prepared(sample)
    (leaf,) = prepared.leaves
    x, out = leaf.unc.mean, prepared.out
    jacobian = jacrev(prepared.fn)(x).reshape(out.numel(), x.numel())
    maps = x.shape[0] * x.shape[1]
    per_map = torch.block_diag(*leaf.var.sqrt().reshape(maps, 1, -1).unbind(0))  # row m: sd on map m, else 0
    expected = (jacobian @ per_map.T).square().sum(1).reshape(out.shape)
    actual = prepared.rule_call("diag", {"interpolation": "correlated"})
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
