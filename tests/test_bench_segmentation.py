"""benchmarks/bench_segmentation.py on a small instance: its data, and its claim that interpolating standard
deviations beats independent positions against Monte Carlo on a trained segmenter's upsampled logits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from fxstream.zoo import relative_posterior

spec = importlib.util.spec_from_file_location(
    "bench_segmentation", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segmentation.py")
bench = sys.modules["bench_segmentation"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_fields_are_labelled_by_their_smooth_part() -> None:
    images, labels = bench.smooth_fields(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 32, 32) and labels.shape == (3, 32, 32)
    assert set(labels.unique().tolist()) == {0, 1, 2}
    assert (images[:, 0][labels == 2].mean() > 0.5) and (images[:, 0][labels == 0].mean() < -0.5)


def test_correlated_positions_beat_independent_ones_against_monte_carlo() -> None:
    model, images, accuracy = bench.trained_segmenter(steps=60, seed=0)
    assert accuracy > 0.6
    posterior = relative_posterior(model, ["classifier.weight", "classifier.bias"], rel_std=0.05)
    rows, maps = bench.evaluate("small", model, images[:2], None, {"last layer": posterior}, samples=1000,
                                linearised=True, repeats=1)
    errors = {row[2]: float(row[3].split(" / ")[0]) for row in rows}
    assert errors["correlated"] < 0.5 * errors["independent"], errors
    # linear in the last layer: the linearised network's draws are the network's own
    assert all(row[3] == row[4] for row in rows)
    assert set(maps) == {"Monte Carlo", "correlated", "independent"}
