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
    """Glob patterns for the model's last ``k`` blocks, e.g. ``["transformer.h.10.*", "transformer.h.11.*"]``.

    A *container* is an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``; only children that hold
    parameters count. A container is a *stage* when every one of those children is a
    block module (not a container, with submodules of its own: ``BasicBlock``, ``GPT2Block``,
    ``MBConv``) or itself a stage (ResNet's ``layer1``, EfficientNet's ``features.3``). A
    non-container module is a stage when its children are ``nn.Sequential`` stages, which chain
    their blocks, and single layers or groups of layers (modules whose children have none),
    at least one a stage (timm's ``stages.2``: ``downsample`` and ``blocks``; a mixture of
    experts' ``gate`` and ``experts`` list is not). The block sequence

    * of a container is its children in order, each stage among them replaced by its own
      block sequence (flattening stages: VGG's ``features`` gives its conv layers, torchvision
      ConvNeXt's ``features`` its stem, every ``CNBlock`` and every downsampling layer);
    * of any other module is the concatenation of the block sequences of its children that
      are stage containers (ResNet: ``layer1.0`` ... ``layer4.1``; timm: ``stages.0.blocks.0``
      ... ``stages.3.blocks.2`` with the stages' downsampling layers in between).

    The blocks are the longest such sequence in the model (the outermost of equally long
    ones), and the patterns name its last ``k``. Transformers keep their layer list
    (``transformer.h``, ``encoder.layer``, ``model.layers``).
    """
    best_name, best = "", []
    for name, module in model.named_modules():
        sequence = _block_sequence(module, name)
        if len(sequence) > len(best):
            best_name, best = name, sequence
    if not best:
        raise PosteriorMismatchError(
            f"{type(model).__name__} has no nn.Sequential or nn.ModuleList of blocks to take the last {k} of"
        )
    if not 0 < k <= len(best):
        where = f"'{best_name}'" if best_name else type(model).__name__
        raise PosteriorMismatchError(f"{where} holds {len(best)} blocks; cannot take the last {k}")
    return [f"{name}.*" for name in best[len(best) - k:]]


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _children(module: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, child) for the children that hold parameters."""
    dot = f"{prefix}." if prefix else ""
    return [(f"{dot}{name}", child) for name, child in module.named_children()
            if next(child.parameters(), None) is not None]


def _is_layer(module: torch.nn.Module) -> bool:
    """A single layer or a group of layers: none of its children has children."""
    return all(next(child.children(), None) is None for child in module.children())


def _is_stage(module: torch.nn.Module) -> bool:
    children = [child for _, child in _children(module, "")]
    if not children:
        return False
    if isinstance(module, _CONTAINERS):
        return all(_is_stage(c) if isinstance(c, _CONTAINERS) else next(c.children(), None) is not None
                   for c in children)
    stages = [c for c in children if isinstance(c, torch.nn.Sequential) and _is_stage(c)]
    return bool(stages) and all(any(c is s for s in stages) or _is_layer(c) for c in children)


def _flattened(module: torch.nn.Module, name: str) -> list[str]:
    """The blocks a child of a container stands for: itself, or a stage's block sequence."""
    if not _is_stage(module):
        return [name]
    return [block for child_name, child in _children(module, name) for block in _flattened(child, child_name)]


def _block_sequence(module: torch.nn.Module, name: str) -> list[str]:
    children = _children(module, name)
    if isinstance(module, _CONTAINERS):
        return [block for child_name, child in children for block in _flattened(child, child_name)]
    return [block for child_name, child in children
            if isinstance(child, _CONTAINERS) and _is_stage(child) for block in _flattened(child, child_name)]


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
