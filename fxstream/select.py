"""Pick the Bayesian parameters of a model by name pattern.

Published recipes make only part of a network Bayesian (the last blocks, the
attention values, the MLPs, the head). :func:`select` builds such a posterior
from glob patterns over ``model.named_parameters()``, either with a given
variance or by keeping part of an existing posterior. Parameters left out are
deterministic, and pruning then skips all covariance work upstream of the first
selected one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

import torch

from .errors import PosteriorMismatchError
from .posterior import Diagonal, ParameterCovariance, Posterior

Variance = float | torch.Tensor | Callable[[str, torch.Tensor], torch.Tensor]


class Subset(Posterior):
    """The part of another posterior that covers the given parameter names."""

    def __init__(self, source: Posterior, names: Iterable[str]) -> None:
        self.source = source
        self.names = list(names)

    def parameter_names(self) -> list[str]:
        return list(self.names)

    def covariance(self, name: str) -> ParameterCovariance:
        return self.source.covariance(name)

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        self.source.validate(parameters)

    def __repr__(self) -> str:
        return f"Subset({len(self.names)} parameters of {self.source!r})"


def last_blocks(model: torch.nn.Module, k: int) -> list[str]:
    """Glob patterns for the last ``k`` blocks of the model's longest ``nn.ModuleList``.

    E.g. ``["transformer.h.10.*", "transformer.h.11.*"]`` for GPT-2.
    """
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise PosteriorMismatchError(f"{type(model).__name__} has no nn.ModuleList of blocks to take the last {k} of")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    if not 0 < k <= len(blocks):
        raise PosteriorMismatchError(f"'{name}' holds {len(blocks)} blocks; cannot take the last {k}")
    prefix = f"{name}." if name else ""
    return [f"{prefix}{i}.*" for i in range(len(blocks) - k, len(blocks))]


def select(
    model: torch.nn.Module,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    variance: Variance | Posterior = 1e-4,
) -> Posterior:
    """A posterior over the parameters whose names match ``include`` and none of ``exclude``.

    Args:
        model: the model whose ``named_parameters()`` the patterns match (tied weights
            appear once, under their first name).
        include: glob patterns (``fnmatch``), e.g. ``["*.attn.c_attn.*"]`` or
            ``last_blocks(model, 2)``.
        exclude: glob patterns removed from the selection, e.g. ``["*.bias", "*ln*"]``.
        variance: a float (the same variance for every entry), a tensor broadcastable
            to each parameter, a callable ``(name, parameter) -> variance tensor``, or
            an existing posterior to keep only the selected part of.
    """
    include, exclude = list(include), list(exclude)
    parameters = dict(model.named_parameters())
    names = [
        name for name in parameters
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not names:
        raise PosteriorMismatchError(
            f"no parameter matches include={include} exclude={exclude}; names look like {list(parameters)[:4]}"
        )
    if isinstance(variance, Posterior):
        covered = set(variance.parameter_names())
        missing = [name for name in names if name not in covered]
        if missing:
            raise PosteriorMismatchError(f"the source posterior has no covariance for {missing[:5]}")
        return Subset(variance, names)
    return Diagonal({name: _variance_of(name, parameters[name], variance) for name in names})


def _variance_of(name: str, parameter: torch.Tensor, variance: Variance) -> torch.Tensor:
    if callable(variance):
        value = variance(name, parameter.detach())
    else:
        value = torch.as_tensor(variance, dtype=parameter.dtype, device=parameter.device)
    return torch.broadcast_to(value, parameter.shape).to(parameter.dtype).clone()
