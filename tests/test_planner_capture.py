"""The planner's capture is polite and sees buffers: no torch._dynamo.reset(), batch norm statistics not inputs."""

from __future__ import annotations

import torch
from torch import nn

import fxstream
from fxstream.planner.symbolic import capture_symbolic


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResidualCNN(nn.Module):
    """Stem conv -> ReLU, one residual block with batch norm, a mean-pooled linear head."""

    def __init__(self, channels: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = _Block(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def _residual_cnn() -> tuple[nn.Module, torch.Tensor, fxstream.Diagonal]:
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    with torch.no_grad():  # running statistics that are not the defaults, so a mix-up would show
        model.block.bn.running_mean.uniform_(-0.5, 0.5)
        model.block.bn.running_var.uniform_(0.5, 2.0)
    posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
    return model, torch.randn(2, 3, 48, 48), posterior


def test_batch_norm_statistics_are_buffers_named_after_the_model() -> None:
    model, x, _ = _residual_cnn()
    sym = capture_symbolic(model, (x,), {(0, 0): "batch"})
    roles = {p.qualified_name: p.role for p in sym.captured.placeholders if p.qualified_name}
    assert roles == {**{name: "parameter" for name, _ in model.named_parameters()},
                     "block.bn.running_mean": "buffer", "block.bn.running_var": "buffer"}
    assert [p.tensor is x for p in sym.captured.inputs()] == [False]  # the clone capture marked dynamic
    assert len(sym.captured.inputs()) == 1


def test_plan_of_a_residual_cnn_with_batch_norm_runs_what_streamline_runs() -> None:
    model, x, posterior = _residual_cnn()
    plan = fxstream.plan(model, x, posterior, "1GiB", sizes={"batch": 32})
    chosen = {row.layer for row in plan.layers if row.structure != "none"}
    assert chosen == {"stem", "block.conv1", "block.bn", "block.conv2", "head"}
    # The plan's calibration run is the streamlined model's own predictive at the same posterior.
    streamlined = fxstream.streamline(model, plan.posterior, activation_cov=plan.activation_cov, backend="eager")
    pred = streamlined(x)
    assert torch.isfinite(pred.var).all() and (pred.var > 0).all()
    assert plan.total_at() <= plan.budget


def test_plan_does_not_discard_the_users_compiled_models() -> None:
    """A model compiled before plan() is not compiled again after it (no torch._dynamo.reset())."""
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    compiled = torch.compile(other, backend=counting)
    x = torch.randn(3, 5)
    compiled(x)
    assert len(calls) == 1
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
    fxstream.plan(model, torch.randn(4, 4), posterior, "1MiB")
    fxstream.plan(model, torch.randn(4, 4), posterior, "1MiB")  # and planning twice captures twice
    compiled(x)
    assert len(calls) == 1
