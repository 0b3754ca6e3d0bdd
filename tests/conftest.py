"""Shared test setup: puts tests/ on sys.path (for ``import harness``) and seeds every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
