"""Capture and the pipeline: functional graphs, decomposition fallback, errors that name every op and pass.

Oracle: with deterministic weights, Gaussian input uncertainty and full
activation covariance, a graph without branches must give J S J^T exactly
(method.md, oracle 3), J from ``torch.func.jacrev`` of the model itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxstream
from fxstream.passes.decompose import DECOMPOSED_FROM
from fxstream.planner.inspect_cli import rows
from fxstream.rules import RULES, VALUE_INDEPENDENT

DTYPE = torch.float64


class InPlace(nn.Module):
    """A chain written with in-place ops, as torchvision models write theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3, inplace=True)
        self.last = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.first(x)))
        h.mul_(1.5).add_(0.25)
        copied = torch.empty_like(h)
        copied.copy_(h)
        wide = h.new_zeros(h.shape[0], 8)
        wide[:, 1:7] = copied
        return self.last(wide)

    def out_of_place(self, x: torch.Tensor) -> torch.Tensor:
        """The same function without in-place ops (autograd cannot differentiate the in-place one)."""
        h = torch.relu(self.first(x)) * 1.5 + 0.25
        wide = torch.cat([h.new_zeros(h.shape[0], 1), h, h.new_zeros(h.shape[0], 1)], dim=1)
        return self.last(wide)


class Activation(nn.Module):
    """Linear -> f -> Linear for an elementwise f given as a function."""

    def __init__(self, function) -> None:
        super().__init__()
        self.first, self.last, self.function = nn.Linear(4, 6), nn.Linear(6, 3), function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.function(self.first(x)))


def _linearised_output_cov(model, x: torch.Tensor, input_cov: torch.Tensor) -> torch.Tensor:
    jacobian = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x)
    return jacobian @ input_cov @ jacobian.transpose(1, 2)


def _streamlined_cov(model: nn.Module, x: torch.Tensor, input_cov: torch.Tensor):
    streamlined = fxstream.streamline(model, input_cov=input_cov, activation_cov="full", backend="eager")
    pred = streamlined(x)
    return streamlined, pred, pred.cov.reshape(x.shape[0], pred.mean.shape[1], pred.mean.shape[1])


def _model(cls, *args) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).to(DTYPE).eval()


def test_in_place_ops_arrive_functional_and_match_the_linearisation() -> None:
    model = _model(InPlace)
    x, input_cov = torch.randn(3, 4, dtype=DTYPE), 0.02 * torch.eye(4, dtype=DTYPE)
    streamlined, pred, cov = _streamlined_cov(model, x, input_cov)
    ops = {n.target for n in streamlined.graphs[0].captured.graph_module.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if getattr(op, "_schema", None) is not None and op._schema.is_mutable]
    torch.testing.assert_close(pred.mean, model(x.clone()), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.out_of_place(x), model(x.clone()), rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, _linearised_output_cov(model.out_of_place, x, input_cov), rtol=1e-10, atol=1e-14)


class Einsum(nn.Module):
    """einsum has no rule: PyTorch's decomposition is permutes, views and a bmm, paired piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.weight = nn.Parameter(torch.randn(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij->bj", torch.tanh(self.first(x)), self.weight)


def test_an_op_without_a_rule_is_decomposed_into_ruled_ops() -> None:
    assert torch.ops.aten.einsum.default not in RULES
    model = _model(Einsum)
    x, input_cov = torch.randn(2, 4, dtype=DTYPE), 0.05 * torch.eye(4, dtype=DTYPE)
    streamlined, pred, cov = _streamlined_cov(model, x, input_cov)
    torch.testing.assert_close(cov, _linearised_output_cov(model, x, input_cov), rtol=1e-10, atol=1e-14)
    graph = streamlined.graphs[0].paired.graph_module.graph
    decomposed = [n for n in graph.nodes if n.meta.get(DECOMPOSED_FROM) == "aten.einsum.default"]
    assert decomposed, "no node records that it came from einsum's decomposition"
    shown = rows(streamlined.graphs[0].paired, {})
    assert any("decomposed aten.einsum.default" in row[1] for row in shown), "inspect does not show the decomposition"


def test_a_pointwise_op_without_a_rule_is_linearised_whole() -> None:
    """celu has no rule; its decomposition would fork x and rejoin it (where), the pointwise fallback does not."""
    assert torch.ops.aten.celu.default not in RULES
    model = _model(Activation, lambda h: F.celu(h, 0.7))
    x, input_cov = torch.randn(2, 4, dtype=DTYPE), 0.05 * torch.eye(4, dtype=DTYPE)
    _, _, cov = _streamlined_cov(model, x, input_cov)
    torch.testing.assert_close(cov, _linearised_output_cov(model, x, input_cov), rtol=1e-10, atol=1e-14)


def test_value_independent_ops_carry_no_covariance() -> None:
    """zeros_like(h) and friends do not depend on h's values: their output is the same for any h."""
    h, other = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)
    aten = torch.ops.aten
    calls = {
        aten.zeros_like.default: (), aten.ones_like.default: (), aten.full_like.default: (2.5,),
        aten.new_zeros.default: ([2, 2],), aten.new_ones.default: ([3],), aten.new_full.default: ([3], 1.5),
    }
    for op, extra in calls.items():
        assert op in VALUE_INDEPENDENT
        torch.testing.assert_close(op(h, *extra), op(other, *extra), rtol=0, atol=0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return h + torch.ones_like(h)

    model = _model(Masked)
    x, input_cov = torch.randn(2, 4, dtype=DTYPE), 0.1 * torch.eye(4, dtype=DTYPE)
    _, _, cov = _streamlined_cov(model, x, input_cov)
    torch.testing.assert_close(cov, _linearised_output_cov(model, x, input_cov), rtol=1e-10, atol=1e-14)


class TwoUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.cummax(h, dim=-1).values + torch.cummin(self.head(h), dim=-1).values


def test_the_error_lists_every_op_without_a_rule() -> None:
    model = _model(TwoUnsupported)
    posterior = fxstream.Diagonal({"fc.weight": torch.full_like(model.fc.weight, 1e-2)})
    with pytest.raises(fxstream.UnsupportedOpError) as caught:
        fxstream.streamline(model, posterior, backend="eager")(torch.randn(2, 4, dtype=DTYPE))
    ops = [op for op, _, _ in caught.value.unsupported]
    assert ops == ["aten.cummax.default", "aten.cummin.default"]
    message = str(caught.value)
    assert "2 ops" in message and "cummax" in message and "cummin" in message


def test_a_failing_pass_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(paired):
        raise RuntimeError("boom")

    monkeypatch.setattr(fxstream.pipeline, "prune", broken)
    model = _model(Activation, torch.tanh)
    with pytest.raises(fxstream.PassError, match="'prune' pass failed: RuntimeError: boom"):
        fxstream.streamline(model, input_var=0.1, backend="eager")(torch.randn(2, 4, dtype=DTYPE))


def test_backpack_hooks_left_by_a_laplace_fit_do_not_block_capture() -> None:
    """laplace-torch's BackPack backend leaves forward and backward hooks on every module."""
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import BackPackGGN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                         backend=BackPackGGN)
    la.fit(torch.utils.data.DataLoader(data, batch_size=16))
    model.eval()
    assert any(m._backward_hooks for m in model.modules()), "the fit left no backward hooks to test with"
    clean = copy.deepcopy(model)
    for module in clean.modules():
        module._forward_hooks.clear()
        module._backward_hooks.clear()
    posterior = fxstream.from_laplace(la)
    x = torch.randn(5, 4)
    hooked = fxstream.streamline(model, posterior, backend="eager")(x)
    expected = fxstream.streamline(clean, posterior, backend="eager")(x)
    torch.testing.assert_close(hooked.var, expected.var, rtol=1e-6, atol=0)
    assert all(m._backward_hooks for m in model.children()), "the call did not give the hooks back"
