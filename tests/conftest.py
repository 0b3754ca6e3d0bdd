"""Shared test setup: puts tests/ on sys.path (for ``import harness``) and seeds every test."""

from __future__ import annotations

import pytest
import torch

import fxstream  # noqa: F401  (before any test imports transformers, timm or laplace-torch: see fxstream._compat)

try:  # property-based tests (tests/test_properties.py): a fixed, derandomised set in CI, seconds long;
    # `pytest --hypothesis-profile=long` searches further with fresh random examples.
    from hypothesis import HealthCheck, Phase, settings

    settings.register_profile("ci", max_examples=8, derandomize=True, deadline=None, database=None,
                              phases=[Phase.explicit, Phase.generate],
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=300, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("ci")
except ImportError:  # a test dependency (pyproject's [test] extra); test_properties.py skips without it
    pass


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
