"""IVON's variational posterior (pip package ``ivon-opt``) as an fxstream posterior.

IVON learns a diagonal Gaussian: per parameter group, the variance of every
entry is 1 / (ess * (hess + weight_decay)), with ``hess`` a flat vector over
the group's parameters in order (exactly what ``IVON.sampled_params`` draws
from). The mean is the parameters themselves, as in fxstream.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PosteriorMismatchError
from ..posterior import Diagonal


def from_ivon(optimizer: Any, model: torch.nn.Module | None = None) -> Diagonal:
    """The diagonal posterior of an ``ivon.IVON`` optimizer, keyed by parameter name.

    Names come from ``model.named_parameters()`` (matched by identity), or from
    the optimizer's own ``param_names`` when it was built from named parameters.
    """
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    variances: dict[str, torch.Tensor] = {}
    for index, group in enumerate(optimizer.param_groups):
        if "hess" not in group:
            raise PosteriorMismatchError(
                f"optimizer parameter group {index} has no 'hess': from_ivon takes an ivon.IVON optimizer"
            )
        variance = 1.0 / (group["ess"] * (group["hess"].detach() + group["weight_decay"]))
        params = [p for p in group["params"] if p is not None]
        given = group.get("param_names")
        sizes = [p.numel() for p in params]
        if sum(sizes) != variance.numel():
            raise PosteriorMismatchError(
                f"IVON group {index} has {variance.numel()} Hessian entries for {sum(sizes)} parameter entries"
            )
        for position, (param, piece) in enumerate(zip(params, torch.split(variance, sizes))):
            name = given[position] if given is not None else names.get(id(param))
            if name is None:
                raise PosteriorMismatchError(
                    "cannot name an IVON parameter: pass the model, from_ivon(optimizer, model), "
                    "with the parameters the optimizer was built on"
                )
            variances[name] = piece.reshape(param.shape)
    return Diagonal(variances)
