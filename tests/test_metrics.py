"""fxstream.metrics against tiny cases computed by hand."""

import math

import pytest
import torch

from fxstream.metrics import accuracy, ece, nlpd

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
