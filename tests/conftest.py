"""Shared test setup: puts tests/ on sys.path (for ``import harness``) and seeds every test."""

from __future__ import annotations

import pytest
import torch

from fxstream._compat import make_torchvision_importable

# torchvision and timm (the zoo's optional extras) import on the CPU torch only with help; laplace-torch
# imports torchvision through torchmetrics, so this comes before any test module imports either.
make_torchvision_importable()


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pretrained", action="store_true",
                     help="also run tests marked 'pretrained' (real weights from requirements/pretrained.txt)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pretrained: loads real pretrained weights (opt in with --pretrained)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked 'pretrained' are opt-in: skipped unless pytest runs with --pretrained."""
    if config.getoption("--pretrained"):
        return
    skip = pytest.mark.skip(reason="real pretrained weights: run with --pretrained")
    for item in items:
        if "pretrained" in item.keywords:
            item.add_marker(skip)
