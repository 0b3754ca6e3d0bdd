"""The ``fxstream`` command line and the pieces of ``fxstream demo``."""

import argparse
import math

import numpy as np
import pytest
import torch

from fxstream import cli, demo


class _Failing:
    """A command module whose command raises, to exercise the CLI's error path."""

    @staticmethod
    def register(subparsers):
        parser = subparsers.add_parser("fail")
        parser.set_defaults(run=_Failing.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        raise ValueError("first line\nsecond line")


@pytest.fixture
def failing_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, _Failing))


def test_cli_error_is_one_line_and_exit_code_1(failing_command, capsys):
    assert cli.main(["fail"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "ValueError: first line" in err and "--debug" in err


@pytest.mark.parametrize("argv", [["--debug", "fail"], ["fail", "--debug"]])
def test_cli_debug_shows_the_traceback(failing_command, argv):
    with pytest.raises(ValueError, match="first line"):
        cli.main(argv)


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["demo", "--epochs", "0"], ["demo", "--backend", "tvm"]])
def test_cli_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_monte_carlo_with_zero_variance_is_the_map_softmax():
    torch.manual_seed(0)
    model = demo.make_mlp(5).eval()
    x = torch.randn(7, 5)
    variances = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    probs = demo.monte_carlo_probs(model, variances, x, 20, torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs, model(x).softmax(-1))


def test_monte_carlo_matches_quadrature_for_an_uncertain_bias():
    """Only the bias of class 0 uncertain: p_0 = E[sigmoid(d)], d ~ N(logit_0 - logit_1, v), two classes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    x = torch.randn(4, 3)
    var = 2.0
    variances = {"0.bias": torch.tensor([var, 0.0])}
    probs = demo.monte_carlo_probs(model, variances, x, 20000, torch.Generator().manual_seed(1), chunk=5000)
    with torch.no_grad():
        logits = model(x).double()
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    d = (logits[:, 0] - logits[:, 1]).numpy()[:, None] + math.sqrt(var) * nodes[None, :]
    expected = (1 / (1 + np.exp(-d)) * weights).sum(1) / weights.sum()
    torch.testing.assert_close(probs[:, 0].double(), torch.from_numpy(expected), atol=0.01, rtol=0)


def test_rotate_by_90_degrees_is_rot90():
    """On a square grid a quarter turn moves every pixel centre onto another: bilinear sampling is exact."""
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.testing.assert_close(demo.rotate(images, 90.0), torch.rot90(images, 1, dims=(2, 3)))
    torch.testing.assert_close(demo.rotate(images, 0.0), images)


def test_digits_split_holds_out_8_and_9_and_standardises_on_training_statistics():
    from sklearn.datasets import load_digits

    data = demo.load_digits_split(0)
    _, y = load_digits(return_X_y=True)
    x_train, y_train = data.train
    assert len(x_train) + len(data.val[0]) + len(data.test[0]) == int((y < 8).sum())
    assert len(data.ood) == int((y >= 8).sum())
    assert all(int(labels.max()) == 7 for _, labels in (data.train, data.val, data.test))
    assert torch.equal(data.shifted[1], data.test[1])
    torch.testing.assert_close(x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    varying = x_train.std(0) > 1  # pixels whose training std is below 1 are only centred
    torch.testing.assert_close(x_train.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_demo_end_to_end_eager():
    """The README's demo on the eager backend: 20 tuning passes, fxstream keeps the MAP's accuracy, finite metrics."""
    pytest.importorskip("laplace", reason="the demo fits its posterior with laplace-torch")
    rows, tuned = demo.evaluate(seed=0, epochs=3, backend="eager", repeats=1, log=lambda text: None)
    rows = {row.method.split(" ")[0]: row for row in rows}
    assert set(rows) == {"MAP", "MC-100", "laplace-torch", "fxstream"}
    assert tuned.passes == 20 and tuned.prior_precision > 0
    assert rows["MAP"].accuracy > 0.9
    assert abs(rows["fxstream"].accuracy - rows["MAP"].accuracy) < 0.03
    assert all(math.isfinite(r.nlpd) and math.isfinite(r.shifted_nlpd) and 0 <= r.ece <= 1 and
               0 <= r.ood_auroc <= 1 and r.predict_seconds > 0 for r in rows.values())
