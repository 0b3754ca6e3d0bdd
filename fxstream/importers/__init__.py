"""Converters from other libraries' fitted posteriors to fxstream posteriors."""

from .ivon import from_ivon
from .laplace import from_laplace

__all__ = ["from_ivon", "from_laplace"]
