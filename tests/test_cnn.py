"""CNN recipes: ``last_blocks`` finds the blocks of torchvision and timm CNNs, and ``select`` plus
``streamline`` run on them (random weights, small inputs)."""

from __future__ import annotations

import fnmatch

import pytest
import torch

import fxstream
from fxstream.select import last_blocks, select

torchvision_models = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

# (library, model): the last two blocks.
LAST_TWO = {
    ("torchvision", "resnet18"): ["layer4.0.*", "layer4.1.*"],
    ("torchvision", "resnet50"): ["layer4.1.*", "layer4.2.*"],
    ("torchvision", "mobilenet_v3_small"): ["features.11.*", "features.12.*"],
    ("torchvision", "convnext_tiny"): ["features.7.1.*", "features.7.2.*"],
    ("torchvision", "efficientnet_b0"): ["features.7.0.*", "features.8.*"],
    ("torchvision", "vgg11"): ["features.16.*", "features.18.*"],
    ("timm", "resnet18"): ["layer4.0.*", "layer4.1.*"],
    ("timm", "convnext_atto"): ["stages.3.blocks.0.*", "stages.3.blocks.1.*"],
    ("timm", "efficientnet_b0"): ["blocks.5.3.*", "blocks.6.0.*"],
    ("timm", "mobilenetv3_small_050"): ["blocks.4.2.*", "blocks.5.0.*"],
}
RUN = [key for key in LAST_TWO if key[1] != "vgg11"]  # VGG-11 at 64x64 is only slow, not different


def build(library: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False) if library == "timm" else getattr(torchvision_models, name)()
    return model.eval()


@pytest.mark.parametrize("library, name", list(LAST_TWO), ids=lambda v: v)
def test_last_blocks_of_cnns(library: str, name: str) -> None:
    model = build(library, name)
    patterns = last_blocks(model, 2)
    assert patterns == LAST_TWO[library, name]
    parameters = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in parameters), pattern
    assert last_blocks(model, 1) == patterns[1:]


def test_stage_flattening_rules() -> None:
    """Sequentials of blocks are flattened, groups of layers and block modules are not."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    class Stage(nn.Module):  # timm-style: a downsampling layer group and a Sequential of blocks
        def __init__(self, blocks: int) -> None:
            super().__init__()
            self.downsample = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
            self.blocks = nn.Sequential(*(Block() for _ in range(blocks)))

    class Experts(nn.Module):  # a mixture of experts: its list stays inside the layer
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.experts = nn.Linear(2, 4), nn.ModuleList(Block() for _ in range(4))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
            self.stages = nn.Sequential(Stage(2), Stage(3))
            self.head = nn.Linear(2, 3)

    class MixtureOfExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Experts() for _ in range(6))

    assert last_blocks(Model(), 3) == ["stages.1.blocks.0.*", "stages.1.blocks.1.*", "stages.1.blocks.2.*"]
    assert last_blocks(Model(), 7)[:2] == ["stages.0.downsample.*", "stages.0.blocks.0.*"]
    assert last_blocks(MixtureOfExperts(), 1) == ["layers.5.*"]  # not layers.5.experts.3
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert last_blocks(plain, 1) == ["2.*"]
    with pytest.raises(fxstream.PosteriorMismatchError, match="cannot take the last 3"):
        last_blocks(plain, 3)
    with pytest.raises(fxstream.PosteriorMismatchError, match="no nn.Sequential"):
        last_blocks(nn.Linear(2, 2), 1)


@pytest.mark.parametrize("library, name", RUN, ids=lambda v: v)
def test_select_and_streamline_run_on_cnns(library: str, name: str) -> None:
    model = build(library, name)
    posterior = select(model, include=last_blocks(model, 2), variance=1e-4)
    x = torch.randn(1, 3, 64, 64)
    predictive = fxstream.streamline(model, posterior, backend="eager")(x)
    with torch.no_grad():
        torch.testing.assert_close(predictive.mean, model(x), rtol=1e-4, atol=1e-4)
    assert predictive.var.shape == predictive.mean.shape
    assert bool((predictive.var > 0).all()) and bool(predictive.var.isfinite().all())
