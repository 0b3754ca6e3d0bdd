"""fxstream.metrics against tiny cases computed by hand."""

import math

import pytest
import torch

from fxstream.errors import FxstreamError
from fxstream.metrics import accuracy, brier, ece, nlpd, ood_auroc
from fxstream.plot import reliability_diagram

PROBS = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
TARGETS = torch.tensor([0, 1, 1, 0])


def test_accuracy_counts_argmax_hits():
    # predictions 0, 1, 0, 1 against targets 0, 1, 1, 0: two hits out of four
    assert accuracy(PROBS, TARGETS) == 0.5


def test_nlpd_is_mean_negative_log_of_target_probability():
    expected = -(math.log(0.9) + math.log(0.7) + math.log(0.4) + math.log(0.2)) / 4
    assert nlpd(PROBS, TARGETS) == pytest.approx(expected, rel=1e-6)


def test_nlpd_of_zero_probability_is_large_but_finite():
    value = nlpd(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(value) and value > 700


def test_ece_two_bins_by_hand():
    # confidences 0.9, 0.7, 0.6, 0.8 with bins (0, .5], (.5, 1]: all in the top bin,
    # accuracy 0.5, mean confidence 0.75 -> ECE 0.25
    assert ece(PROBS, TARGETS, bins=2) == pytest.approx(0.25)


def test_ece_fifteen_bins_by_hand():
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.7 -> bin 10, 0.6 -> bin 8, 0.8 -> bin 11;
    # each bin holds one sample: |1-0.9| + |1-0.7| + |0-0.6| + |0-0.8| over 4
    assert ece(PROBS, TARGETS) == pytest.approx((0.1 + 0.3 + 0.6 + 0.8) / 4)


def test_ece_pools_samples_of_a_bin_before_taking_the_gap():
    # both at confidence 0.75, one right one wrong: bin accuracy 0.5, gap 0.25
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert ece(probs, torch.tensor([0, 1]), bins=10) == pytest.approx(0.25)


def test_ece_of_perfectly_calibrated_confident_predictions_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ece(probs, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_brier_by_hand():
    # squared distances to one-hot: (.1^2+.1^2), (.3^2+.3^2), (.6^2+.6^2), (.8^2+.8^2)
    assert brier(PROBS, TARGETS) == pytest.approx(2 * (0.01 + 0.09 + 0.36 + 0.64) / 4)


def test_ece_equals_a_loop_over_hand_built_bins():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=g), -1)
    targets = torch.randint(0, 4, (500,), generator=g)
    confidence, predicted = probs.max(-1)
    total = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = (predicted[inside] == targets[inside]).double().mean() - confidence[inside].double().mean()
            total += inside.sum().item() * abs(gap.item())
    assert ece(probs, targets, bins=10) == pytest.approx(total / 500, rel=1e-12)


def test_ood_auroc_equals_the_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(1)
    score_in = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    score_out = torch.randint(2, 9, (30,), generator=g).float()
    pairs = (score_out[None, :] > score_in[:, None]).double() + 0.5 * (score_out[None, :] == score_in[:, None]).double()
    assert ood_auroc(score_in, score_out) == pytest.approx(pairs.mean().item(), rel=1e-12)
    assert ood_auroc(torch.zeros(3), torch.ones(2)) == 1.0
    assert ood_auroc(torch.ones(3), torch.ones(2)) == 0.5


def test_metrics_return_floats():
    values = [accuracy(PROBS, TARGETS), nlpd(PROBS, TARGETS), ece(PROBS, TARGETS), brier(PROBS, TARGETS),
              ood_auroc(PROBS[:, 0], PROBS[:, 1])]
    assert all(type(v) is float for v in values)


def test_reliability_diagram_writes_a_png_or_names_the_extra(tmp_path):
    path = tmp_path / "reliability.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(FxstreamError, match=r"fxstream\[plot\]"):
            reliability_diagram(PROBS, TARGETS, path)
        return
    reliability_diagram(PROBS, TARGETS, path, bins=5, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
