"""Bad inputs raise fxstream errors whose messages say what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxstream


class CumulativeHead(nn.Module):
    """A submodule applying an op with no covariance rule (cummax) to an uncertain activation."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cummax(h, dim=-1).values


class WithCummax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = CumulativeHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


class Branchy(nn.Module):
    """Data-dependent Python control flow: Dynamo cannot capture it as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3).eval()


def test_unknown_op_names_the_op_the_module_and_the_way_out() -> None:
    torch.manual_seed(0)
    model = WithCummax().eval()
    posterior = fxstream.Diagonal({"fc.weight": torch.full_like(model.fc.weight, 1e-2)})
    streamlined = fxstream.streamline(model, posterior, backend="eager")
    with pytest.raises(fxstream.UnsupportedOpError) as caught:
        streamlined(torch.randn(2, 4))
    message = str(caught.value)
    assert "cummax" in message
    assert "in head (CumulativeHead)" in message
    assert "leave them out of the posterior" in message and "file the op" in message


def test_a_fused_transformer_kernel_names_the_switch_that_avoids_it() -> None:
    """torch.compile(backend="streamline") on nn.TransformerEncoder with the fused inference path on: the error
    says how to turn it off (fxstream.streamline turns it off itself)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    posterior = fxstream.select(model, include=["layers.0.linear2.*"], variance=1e-3)
    compiled = torch.compile(model, backend="streamline", fullgraph=True,
                             options={"posterior": posterior, "backend": "eager"})
    with pytest.raises(Exception) as caught, torch.no_grad():
        compiled(torch.randn(2, 3, 4))
    message = str(caught.value)
    assert "_transformer_encoder_layer_fwd" in message and "set_fastpath_enabled(False)" in message


def test_op_without_a_rule_is_harmless_where_no_uncertainty_reaches_it() -> None:
    """cummax on the deterministic input only: no covariance needed, so no error."""

    class InputCummax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cummax(x, dim=-1).values)

    torch.manual_seed(0)
    model = InputCummax().eval()
    x = torch.randn(2, 4)
    pred = fxstream.streamline(model, fxstream.Diagonal({"fc.weight": torch.full_like(model.fc.weight, 1e-2)}),
                               backend="eager")(x)
    expected = torch.cummax(x, dim=-1).values.square() @ torch.full((4, 3), 1e-2)
    torch.testing.assert_close(pred.var, expected)


def test_wrong_parameter_name_is_named_with_close_matches() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(fxstream.PosteriorMismatchError, match=r"'fc\.weight'.*does not have.*'0\.weight'"):
        fxstream.streamline(model, fxstream.Diagonal({"fc.weight": torch.ones(3, 4)}), backend="eager")


def test_wrong_shape_names_both_shapes() -> None:
    with pytest.raises(fxstream.PosteriorMismatchError, match=r"'weight' has shape \(4, 3\).*shape \(3, 4\)"):
        fxstream.streamline(linear(), fxstream.Diagonal({"weight": torch.ones(4, 3)}), backend="eager")


def test_negative_variance_is_rejected() -> None:
    bad = torch.full((3, 4), 1e-2)
    bad[1, 2] = -0.5
    with pytest.raises(fxstream.PosteriorMismatchError, match=r"'weight' has negative entries \(min -0\.5\)"):
        fxstream.Diagonal({"weight": bad})


def test_negative_input_variance_is_rejected() -> None:
    streamlined = fxstream.streamline(linear(), input_var=torch.tensor([0.1, -0.1, 0.1, 0.1]), backend="eager")
    with pytest.raises(fxstream.FxstreamError, match="negative"):
        streamlined(torch.randn(2, 4))


def test_graph_break_says_covariance_cannot_cross_it() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    posterior = fxstream.Diagonal({"fc.weight": torch.full((3, 4), 1e-2)})
    streamlined = fxstream.streamline(model, posterior, backend="eager")
    with pytest.raises(fxstream.GraphBreakError, match="single graph.*cannot cross a graph break"):
        streamlined(torch.randn(2, 4))


def test_training_mode_is_rejected() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(fxstream.FxstreamError, match=r"training mode.*model\.eval\(\)"):
        fxstream.streamline(model, fxstream.Diagonal({"weight": torch.ones(3, 4)}), backend="eager")


def test_nothing_uncertain_is_rejected() -> None:
    with pytest.raises(fxstream.FxstreamError, match="nothing is uncertain"):
        fxstream.streamline(linear(), backend="eager")


def test_unknown_activation_structure_is_rejected() -> None:
    with pytest.raises(fxstream.FxstreamError, match="activation_cov must be 'diag' or 'full'"):
        fxstream.streamline(linear(), fxstream.Diagonal({"weight": torch.ones(3, 4)}), activation_cov="dense")


class OuterProduct(nn.Module):
    """h h^T of an uncertain activation: a product of two uncertain operands."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return (h.unsqueeze(-1) @ h.unsqueeze(-2)).flatten(1)


def test_a_configuration_a_rule_declines_names_the_module_and_what_to_do() -> None:
    """A rule's capability check, not an error from inside the rewritten graph."""
    torch.manual_seed(0)
    model = OuterProduct().eval()
    posterior = fxstream.Diagonal({"fc.weight": torch.full_like(model.fc.weight, 1e-2)})
    with pytest.raises(fxstream.UnsupportedOpError) as caught:
        fxstream.streamline(model, posterior, backend="eager", activation_cov="full")(torch.randn(2, 4))
    message = str(caught.value)
    assert "two uncertain operands" in message and "activation_cov='diag'" in message
    assert "OuterProduct" in message
    pred = fxstream.streamline(model, posterior, backend="eager")(torch.randn(2, 4))
    assert pred.var.shape == (2, 9)
