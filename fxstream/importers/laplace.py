"""laplace-torch posteriors as fxstream posteriors, with the structure laplace-torch fitted.

laplace-torch stores a fitted posterior flat, in ``model.parameters()`` order
over the parameters it covers: every parameter that requires grad
(``subset_of_weights="all"``), those of the last layer (``"last_layer"``), or
chosen entries of that vector (subnetwork). :func:`from_laplace` cuts it back
into per-parameter (or per-layer) pieces named as in the user's model and
keeps the structure:

=====================  ===============================================
laplace-torch          fxstream
=====================  ===============================================
Diag[LL|Subnet]Laplace ``Diagonal`` (posterior_variance)
Kron[LL]Laplace        ``KFAC.from_eigen`` (exact eigen form, its prior,
                       ``_H_factor`` and ``damping``)
Full[LL|Subnet]Laplace ``Dense`` per layer (weight and bias jointly)
=====================  ===============================================

What laplace-torch folds into its posterior comes along: the prior precision
(scalar, layerwise or diagonal), ``sigma_noise`` and ``temperature`` (through
``_H_factor``). ``sigma_noise`` also enters the regression predictive: pass
``sigma_noise=float(la.sigma_noise)`` to :func:`fxstream.streamline`.
A full posterior over several layers keeps each layer's block; the covariance
between layers is dropped, because fxstream propagates layers independently.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PosteriorMismatchError
from ..posterior import KFAC, Dense, Diagonal, Posterior


def from_laplace(la: Any) -> Posterior:
    """The fxstream posterior of a fitted laplace-torch ``Laplace`` object.

    Streamline the same model ``la`` was fitted on: the posterior mean is the
    model's current parameters.
    """
    from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace

    if getattr(la, "H", None) is None or not getattr(la, "n_data", 0):
        raise PosteriorMismatchError(f"the {type(la).__name__} has no Hessian yet; call la.fit(...) first")
    covered = _covered(la)
    indices = _subnetwork(la)
    if isinstance(la, DiagLaplace):
        return Diagonal(_split(covered, la.posterior_variance, indices))
    if isinstance(la, KronLaplace):
        return _kron(la, covered)
    if isinstance(la, FullLaplace):
        if indices is not None:
            covered, cov = _scatter(covered, indices, la.posterior_covariance)
        else:
            cov = la.posterior_covariance
        return Dense.from_flat(cov.detach(), {name: p.shape for name, p in covered})
    raise PosteriorMismatchError(
        f"from_laplace does not convert {type(la).__name__}; fit with hessian_structure "
        "'diag', 'kron' or 'full'"
    )


def _covered(la: Any) -> list[tuple[str, torch.Tensor]]:
    """(name in the user's model, parameter) of every parameter the flat posterior covers, in its order."""
    from laplace.lllaplace import LLLaplace

    if isinstance(la, LLLaplace):
        # FeatureExtractor wraps a deep copy of the model; the layer keeps its name inside it.
        layer = la.model._last_layer_name
        if layer is None:
            raise PosteriorMismatchError("the Laplace object has no last layer yet; call la.fit(...) first")
        return [(f"{layer}.{name}", p) for name, p in la.model.last_layer.named_parameters()]
    return [(name, p) for name, p in la.model.named_parameters() if p.requires_grad]


def _subnetwork(la: Any) -> torch.Tensor | None:
    from laplace.subnetlaplace import SubnetLaplace

    return la.backend.subnetwork_indices if isinstance(la, SubnetLaplace) else None


def _split(covered: list[tuple[str, torch.Tensor]], flat: torch.Tensor,
           indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cut a flat per-entry vector into tensors shaped like the covered parameters.

    With subnetwork ``indices`` the vector holds only those entries; the
    others get 0 and parameters with no chosen entry are left out.
    """
    flat = flat.detach()
    sizes = [p.numel() for _, p in covered]
    if indices is not None:
        full = flat.new_zeros(sum(sizes))
        full[indices] = flat
        touched = torch.zeros(sum(sizes), dtype=torch.bool)
        touched[indices] = True
        flat = full
    if sum(sizes) != flat.numel():
        raise PosteriorMismatchError(
            f"the Laplace posterior has {flat.numel()} entries but the parameters it covers have "
            f"{sum(sizes)}; was the model changed after la.fit(...)?"
        )
    pieces = dict(zip((n for n, _ in covered), torch.split(flat, sizes)))
    if indices is not None:
        chosen = dict(zip((n for n, _ in covered), torch.split(touched, sizes)))
        pieces = {n: v for n, v in pieces.items() if chosen[n].any()}
    return {name: pieces[name].reshape(p.shape) for name, p in covered if name in pieces}


def _scatter(covered, indices: torch.Tensor, cov: torch.Tensor):
    """A subnetwork's covariance spread over the parameters it touches (zero elsewhere)."""
    sizes = [p.numel() for _, p in covered]
    owner = torch.repeat_interleave(torch.arange(len(covered)), torch.tensor(sizes))
    touched = sorted(set(owner[indices].tolist()))
    starts = torch.cumsum(torch.tensor([0] + sizes), 0)
    offsets, position = {}, 0
    for i in touched:
        offsets[i] = position
        position += sizes[i]
    local = torch.tensor([offsets[int(owner[j])] + int(j - starts[owner[j]]) for j in indices.tolist()])
    full = cov.new_zeros(position, position)
    full[local[:, None], local[None, :]] = cov.detach()
    return [covered[i] for i in touched], full


def _kron(la: Any, covered: list[tuple[str, torch.Tensor]]) -> KFAC:
    """KronDecomposed (eigenvectors, eigenvalues per factor) plus its prior, exactly."""
    decomposed = la.H
    groups = list(zip(decomposed.eigenvectors, decomposed.eigenvalues))
    if len(groups) != len(covered):
        raise PosteriorMismatchError(
            f"the Kron posterior has {len(groups)} factor groups but covers {len(covered)} parameters "
            f"({[n for n, _ in covered]}); was the model changed after la.fit(...)?"
        )
    prior = la.prior_precision.detach().reshape(-1)
    eigen, deltas, shapes = {}, {}, {}
    for i, ((name, param), (vectors, values)) in enumerate(zip(covered, groups)):
        sizes = tuple(len(v) for v in values)
        expected = (param.shape[0], param[0].numel()) if param.dim() >= 2 else (param.numel(),)
        if sizes != expected:
            raise PosteriorMismatchError(
                f"Kron factors of parameter '{name}' have sizes {sizes}, but its shape "
                f"{tuple(param.shape)} needs {expected}; laplace-torch's parameter order does not "
                "match the model"
            )
        eigen[name] = [(q.detach(), l.detach()) for q, l in zip(vectors, values)]
        deltas[name] = prior[i] if prior.numel() > 1 else prior[0]
        shapes[name] = tuple(param.shape)
    return KFAC.from_eigen(eigen, deltas, la._H_factor, damping=bool(la.damping), shapes=shapes)
