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

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import PosteriorMismatchError
from ..posterior import KFAC, Dense, Diagonal, PerParameter, Posterior, per_parameter


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
        posterior: Posterior = Diagonal(_split(covered, la.posterior_variance, indices))
        hessian = _split(covered, la.H, indices)
        mask = None if indices is None else {n: v > 0 for n, v in _split(covered, torch.ones_like(la.H), indices).items()}
        h = float(la._H_factor)
        posterior._prior_form = _keeping_marglik(lambda prior: Diagonal.from_precision(hessian, prior, h, mask=mask), la,
                                                 list(hessian))
    elif isinstance(la, KronLaplace):
        posterior = _kron(la, covered)
        posterior._prior_form = _keeping_marglik(posterior._prior_form, la, posterior.parameter_names())
    elif isinstance(la, FullLaplace):
        posterior = _full(la, covered, indices, la.posterior_covariance)
        posterior._prior_form = _keeping_marglik(_full_form(la, covered, indices), la,
                                                 posterior.parameter_names())
    else:
        raise PosteriorMismatchError(
            f"from_laplace does not convert {type(la).__name__}; fit with hessian_structure "
            "'diag', 'kron' or 'full'"
        )
    posterior.prior_precision = la.prior_precision.detach().clone()
    posterior._marglik = _marglik(la, posterior.parameter_names())
    return posterior


def _full(la: Any, covered, indices: torch.Tensor | None, cov: torch.Tensor) -> Dense:
    """Per-layer blocks of a full (or subnetwork) covariance over laplace-torch's flat vector."""
    if indices is not None:
        covered, cov = _scatter(covered, indices, cov)
    return Dense.from_flat(cov.detach(), {name: p.shape for name, p in covered})


def _full_form(la: Any, covered, indices: torch.Tensor | None) -> Callable[[PerParameter], Posterior]:
    """prior -> Dense posterior (h H + diag(p))^-1, the prior expanded to laplace-torch's flat entries."""
    hessian, h = la.H.detach(), float(la._H_factor)
    sizes = torch.tensor([p.numel() for _, p in covered])
    owner = torch.repeat_interleave(torch.arange(len(covered)), sizes)
    if indices is not None:
        owner = owner[indices]
    names = [name for name, _ in covered]
    present = sorted(set(owner.tolist()))

    def form(prior: PerParameter) -> Posterior:
        priors = per_parameter(prior, [names[i] for i in present], "prior precision")
        per_entry = torch.tensor([priors.get(n, 0.0) for n in names], dtype=hessian.dtype)[owner]
        precision = h * hessian + torch.diag(per_entry.to(hessian.device))
        chol, info = torch.linalg.cholesky_ex(precision)
        if info.item() != 0:
            raise PosteriorMismatchError(
                "the posterior precision h H + diag(prior) is not positive definite under this prior precision; "
                "give a larger prior precision"
            )
        return _full(la, covered, indices, torch.cholesky_inverse(chol))

    return form


def _keeping_marglik(form: Callable[[PerParameter], Posterior], la: Any,
                     names: list[str]) -> Callable[[PerParameter], Posterior]:
    """A prior form whose posteriors keep the prior they were made with and laplace-torch's marginal likelihood."""

    def with_prior(prior: PerParameter) -> Posterior:
        posterior = form(prior)
        posterior._prior_form = with_prior
        posterior.prior_precision = prior
        posterior._marglik = _marglik(la, names)
        return posterior

    return with_prior


def _marglik(la: Any, names: list[str]) -> Callable[[PerParameter, float | None], float]:
    """(prior, sigma_noise) -> ``la.log_marginal_likelihood``, the prior as laplace-torch takes it (a scalar;
    per layer for Kron; per entry otherwise); ``la`` is left as it was."""
    from laplace.baselaplace import KronLaplace

    covered = _covered(la)
    owner = torch.repeat_interleave(torch.arange(len(covered)), torch.tensor([p.numel() for _, p in covered]))
    indices = _subnetwork(la)
    if indices is not None:
        owner = owner[indices]

    def marglik(prior: PerParameter, sigma_noise: float | None = None) -> float:
        if isinstance(prior, Mapping):
            priors = per_parameter(prior, names, "prior precision")
            per_layer = torch.tensor([priors.get(n, 0.0) for n, _ in covered], dtype=la._dtype)
            value = per_layer if isinstance(la, KronLaplace) else per_layer[owner]
        else:
            value = torch.tensor([per_parameter(prior, ["<all>"], "prior precision")["<all>"]], dtype=la._dtype)
        sigma = None if sigma_noise is None else torch.tensor(sigma_noise, dtype=la._dtype, device=la._device)
        saved_prior, saved_sigma = la.prior_precision, la.sigma_noise
        try:
            with torch.no_grad():
                return float(la.log_marginal_likelihood(value.to(la._device), sigma))
        finally:
            la.prior_precision, la.sigma_noise = saved_prior, saved_sigma

    return marglik


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
