"""Gaussian weight posteriors: which parameters are uncertain and how.

A posterior's mean is always the model's current parameters; a posterior only
adds a covariance to some of them. Parameters it does not name stay
deterministic, so pruning removes all covariance work upstream of the first
uncertain one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import PosteriorMismatchError


@dataclass(frozen=True)
class ParameterCovariance:
    """The covariance of one parameter as the rules consume it.

    ``kind`` names the structure (``"param_diag"``: one variance per entry, same
    shape as the parameter); ``tensors`` are its buffers in the rewritten graph.
    """

    kind: str
    tensors: tuple[torch.Tensor, ...]


class Posterior(ABC):
    """A Gaussian posterior over some of a model's parameters."""

    @abstractmethod
    def parameter_names(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the uncertain parameters."""

    @abstractmethod
    def covariance(self, name: str) -> ParameterCovariance:
        """The covariance of parameter ``name`` in the form rules consume."""

    @abstractmethod
    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Raise PosteriorMismatchError unless the posterior fits these parameters."""


class Diagonal(Posterior):
    """A diagonal (mean-field) Gaussian posterior.

    ``variances`` maps parameter names, as in ``model.named_parameters()``, to
    tensors of the parameter's shape holding one variance per entry.
    """

    def __init__(self, variances: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(variances, Mapping):
            raise PosteriorMismatchError(
                "Diagonal(variances) takes a mapping from parameter name to a variance tensor, "
                f"got {type(variances).__name__}"
            )
        checked: dict[str, torch.Tensor] = {}
        for name, var in variances.items():
            if not isinstance(var, torch.Tensor):
                raise PosteriorMismatchError(
                    f"variance of parameter '{name}' must be a tensor, got {type(var).__name__}"
                )
            var = var.detach()
            if not torch.is_floating_point(var):
                raise PosteriorMismatchError(
                    f"variance of parameter '{name}' must be floating point, got {var.dtype}"
                )
            if not torch.isfinite(var).all():
                raise PosteriorMismatchError(f"variance of parameter '{name}' has non-finite entries")
            if (var < 0).any():
                worst = var.min().item()
                raise PosteriorMismatchError(
                    f"variance of parameter '{name}' has negative entries (min {worst:.3g}); "
                    "variances must be >= 0"
                )
            checked[name] = var
        self.variances = checked

    def parameter_names(self) -> list[str]:
        return list(self.variances)

    def covariance(self, name: str) -> ParameterCovariance:
        return ParameterCovariance("param_diag", (self.variances[name],))

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        for name, var in self.variances.items():
            if name not in parameters:
                close = [p for p in parameters if p.split(".")[-1] == name.split(".")[-1]][:5]
                hint = f"; parameters with a similar name: {close}" if close else ""
                raise PosteriorMismatchError(
                    f"posterior names parameter '{name}', which the model does not have{hint}"
                )
            shape = tuple(parameters[name].shape)
            if tuple(var.shape) != shape:
                raise PosteriorMismatchError(
                    f"variance of parameter '{name}' has shape {tuple(var.shape)}, "
                    f"but the parameter has shape {shape}"
                )

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.variances.values())
        return f"Diagonal({len(self.variances)} parameters, {n} variances)"
