"""Gaussian weight posteriors: which parameters are uncertain and how.

A posterior's mean is always the model's current parameters; a posterior only
adds a covariance to some of them. Parameters it does not name stay
deterministic, so pruning removes all covariance work upstream of the first
uncertain one.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import FxstreamError, PosteriorMismatchError
from .rules.weights import AFFINE_BIAS, marginal_variance

#: A number for every uncertain parameter: one for all, or a mapping whose keys are parameter names or
#: module paths (``"2"`` covers ``"2.weight"`` and ``"2.bias"``; the longest matching key wins).
PerParameter = float | torch.Tensor | Mapping[str, float | torch.Tensor]


def per_parameter(value: PerParameter, names: Sequence[str], what: str) -> dict[str, float]:
    """``value`` as one nonnegative float per parameter name, or a PosteriorMismatchError naming what is wrong."""

    def number(v: float | torch.Tensor, name: str) -> float:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise PosteriorMismatchError(
                    f"{what} of parameter '{name}' must be one scalar, got a tensor of shape {tuple(v.shape)}; "
                    "give one number per parameter or per layer"
                )
            v = v.item()
        if not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise PosteriorMismatchError(f"{what} of parameter '{name}' must be a finite number >= 0, got {v!r}")
        return float(v)

    if not isinstance(value, Mapping):
        one = number(value, "<all>")
        return dict.fromkeys(names, one)
    used: set[str] = set()
    result = {}
    for name in names:
        keys = [k for k in value if k == name or k == "" or name.startswith(f"{k}.")]
        if not keys:
            raise PosteriorMismatchError(
                f"the {what} mapping covers no key for parameter '{name}'; give it by parameter name or by its "
                f"module path (e.g. '{name.rpartition('.')[0]}'), or give one number for all"
            )
        key = max(keys, key=len)
        used.add(key)
        result[name] = number(value[key], name)
    unused = sorted(set(value) - used)
    if unused:
        raise PosteriorMismatchError(
            f"the {what} mapping names {unused}, which match no uncertain parameter of the posterior "
            f"(it covers {list(names)[:8]}{' ...' if len(names) > 8 else ''})"
        )
    return result


def layer_of(name: str) -> str:
    """The module path a parameter belongs to: ``"2"`` for ``"2.weight"``, ``""`` for a top-level one."""
    return name.rpartition(".")[0]


@dataclass(frozen=True)
class ParameterCovariance:
    """The covariance of one parameter as the rules consume it.

    ``kind`` names the structure (``"param_diag"``: one variance per entry, same
    shape as the parameter; the other kinds are listed in
    :mod:`fxstream.rules.weights`); ``tensors`` are its buffers in the
    rewritten graph; ``shape`` is the parameter's shape where the tensors do
    not show it.
    """

    kind: str
    tensors: tuple[torch.Tensor, ...]
    shape: tuple[int, ...] | None = None


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

    #: Set where the posterior keeps its precision form (``from_laplace``, ``KFAC.from_eigen``):
    #: prior precision -> the posterior of the same fit under that prior.
    _prior_form: Callable[[PerParameter], Posterior] | None = None
    #: Set by ``from_laplace``: (prior precision, sigma_noise) -> laplace-torch's log marginal likelihood.
    _marglik: Callable[[PerParameter, float | None], float] | None = None
    #: The prior precision the posterior was built with, where it has a precision form.
    prior_precision: PerParameter | None = None

    @property
    def has_precision_form(self) -> bool:
        """Whether :meth:`with_prior_precision` works: the posterior knows its Hessian and prior."""
        return self._prior_form is not None

    def with_prior_precision(self, prior_precision: PerParameter) -> Posterior:
        """The posterior of the same fit under another prior precision: same structure, same tensor shapes.

        The posterior precision is the (scaled) Hessian plus the prior, so a new prior costs no new
        fit: diagonal 1 / (h H + p); Kronecker eigen form 1 / (h l_B l_A + p) in the rotated basis;
        full (h H + diag(p))^-1. ``prior_precision`` is one number, or a mapping from parameter
        names or module paths (layers) to numbers. Only posteriors built with their precision form
        (``fxstream.from_laplace``, ``KFAC.from_eigen``) have one.
        """
        if self._prior_form is None:
            raise FxstreamError(
                f"this {type(self).__name__} posterior keeps no precision form (Hessian plus prior), so it cannot take "
                "a new prior precision; build it with fxstream.from_laplace(la) or KFAC.from_eigen, or tune "
                "a variance scale instead (posterior.scaled(s), fxstream.tune(..., scale=...))"
            )
        return self._prior_form(prior_precision)

    def scaled(self, scale: PerParameter) -> Posterior:
        """The posterior with its covariance multiplied by ``scale`` >= 0 (0: the MAP network).

        ``scale`` is one number or a mapping from parameter names or module paths to numbers (a
        per-layer scale s_l multiplies the covariance as D^1/2 Cov D^1/2, D = diag(s_l)). The result
        has the same structure and tensor shapes; a precision form comes along (a new prior, then
        the same scale).
        """
        scales = per_parameter(scale, self.parameter_names(), "scale")
        made = self._scaled(scales)
        if self._prior_form is not None:
            form = self._prior_form
            made._prior_form = lambda prior: form(prior).scaled(scale)
            made.prior_precision = self.prior_precision
        return made

    def _scaled(self, scales: Mapping[str, float]) -> Posterior:
        """:meth:`scaled` with one scale per parameter; the default keeps every covariance as the rules consume it."""
        return Entries(_scaled_entries({n: self.covariance(n) for n in self.parameter_names()}, scales))

    def groups(self) -> dict[str, list[str]]:
        """The layers of the posterior: module path -> its uncertain parameters (weight, bias), in order."""
        layers: dict[str, list[str]] = {}
        for name in self.parameter_names():
            layers.setdefault(layer_of(name), []).append(name)
        return layers

    def save(self, path: str | os.PathLike) -> None:
        """Write the posterior to one safetensors file: its tensors, and its structure and parameter
        names in the file's metadata. :func:`load_posterior` reads it back exactly."""
        tensors: dict[str, torch.Tensor] = {}
        structure = self._state("", tensors)
        metadata = {"format": FILE_FORMAT, "version": str(FILE_VERSION), "structure": json.dumps(structure)}
        from safetensors.torch import save_file

        save_file(tensors, os.fspath(path), metadata=metadata)

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        """This posterior's structure (JSON), its tensors added to ``tensors`` under keys starting with ``prefix``.

        The default stores every parameter's covariance as the rules consume it; it loads as a
        posterior with exactly those covariances.
        """
        entries = {name: self.covariance(name) for name in self.parameter_names()}
        return {"type": "Entries", "entries": _entries_state(entries, prefix, tensors)}

    def to_diagonal(self) -> Diagonal:
        """The diagonal posterior with the same (exact) marginal variance of every entry."""
        variances = {}
        for name in self.parameter_names():
            cov = self.covariance(name)
            variances[name] = marginal_variance(cov.kind, cov.tensors, cov.shape)
        return Diagonal(variances)


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
            checked[name] = var.contiguous()
        self.variances = checked

    def parameter_names(self) -> list[str]:
        return list(self.variances)

    def covariance(self, name: str) -> ParameterCovariance:
        return ParameterCovariance("param_diag", (self.variances[name],))

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        _check_shapes({name: tuple(var.shape) for name, var in self.variances.items()}, parameters, "variance")

    @classmethod
    def from_precision(cls, hessian: Mapping[str, torch.Tensor], prior_precision: PerParameter,
                       scale: float = 1.0, *, mask: Mapping[str, torch.Tensor] | None = None) -> Diagonal:
        """The diagonal posterior with precision ``scale * hessian + prior_precision``, keeping that form.

        ``hessian`` maps parameter names to the Hessian's diagonal (the parameter's shape); ``mask``
        (booleans of the same shape) marks the entries that are uncertain, the others get variance 0
        (a subnetwork). :meth:`with_prior_precision` then recomputes ``1 / (scale * H + p)``.
        """
        hessian = {name: h.detach() for name, h in hessian.items()}
        priors = per_parameter(prior_precision, list(hessian), "prior precision")
        variances = {}
        for name, h in hessian.items():
            precision = scale * h + priors[name]
            chosen = mask[name] if mask is not None else torch.ones_like(h, dtype=torch.bool)
            if (precision[chosen] <= 0).any():
                raise PosteriorMismatchError(
                    f"posterior precision of parameter '{name}' has non-positive entries; add a positive prior precision"
                )
            variances[name] = torch.where(chosen, 1.0 / torch.where(chosen, precision, 1.0), 0.0)
        posterior = cls(variances)
        posterior._prior_form = lambda prior: cls.from_precision(hessian, prior, scale, mask=mask)
        posterior.prior_precision = prior_precision
        return posterior

    def _scaled(self, scales: Mapping[str, float]) -> Diagonal:
        return Diagonal({name: var * scales[name] for name, var in self.variances.items()})

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "Diagonal", "variances": {name: _put(tensors, f"{prefix}{name}", var)
                                                 for name, var in self.variances.items()}}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> Diagonal:
        return cls({name: _get(tensors, key) for name, key in state["variances"].items()})

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.variances.values())
        return f"Diagonal({len(self.variances)} parameters, {n} variances)"


def _require(name: str, parameters: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of parameter ``name``; a clear error when the model lacks it."""
    if name not in parameters:
        close = [p for p in parameters if p.split(".")[-1] == name.split(".")[-1]][:5]
        hint = f"; parameters with a similar name: {close}" if close else ""
        raise PosteriorMismatchError(f"posterior names parameter '{name}', which the model does not have{hint}")
    return tuple(parameters[name].shape)


def _check_shapes(expected: Mapping[str, tuple[int, ...]], parameters: Mapping[str, torch.Tensor], what: str) -> None:
    for name, shape in expected.items():
        actual = _require(name, parameters)
        if shape != actual:
            raise PosteriorMismatchError(
                f"{what} of parameter '{name}' has shape {shape}, but the parameter has shape {actual}"
            )


def _checked(name: str, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A detached floating-point tensor with finite entries, or a PosteriorMismatchError."""
    if not isinstance(tensor, torch.Tensor):
        raise PosteriorMismatchError(f"{what} of parameter '{name}' must be a tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if not torch.is_floating_point(tensor):
        raise PosteriorMismatchError(f"{what} of parameter '{name}' must be floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise PosteriorMismatchError(f"{what} of parameter '{name}' has non-finite entries")
    # Contiguous, as a saved posterior loads (a file keeps no strides): the same memory layout gives the
    # same rounding in the rules' products (torch.linalg.eigh's column-major eigenvectors would not).
    return tensor.contiguous()


def _checked_covariance(name: str, cov: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """A square symmetric matrix with a nonnegative diagonal (of side ``size`` when given)."""
    cov = _checked(name, cov, "covariance")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or (size is not None and cov.shape[0] != size):
        want = f"({size}, {size})" if size is not None else "square"
        raise PosteriorMismatchError(
            f"covariance of parameter '{name}' must be {want}, got shape {tuple(cov.shape)}"
        )
    scale = cov.abs().max().clamp_min(torch.finfo(cov.dtype).tiny)
    if ((cov - cov.t()).abs().max() > 1e-5 * scale) or (cov.diagonal() < 0).any():
        raise PosteriorMismatchError(
            f"covariance of parameter '{name}' is not symmetric with a nonnegative diagonal"
        )
    return cov


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """A weight's shape as the matrix (Dout, Din) that KFAC and the rules use (kernels flattened)."""
    d_out = shape[0]
    return d_out, int(torch.Size(shape[1:]).numel())


def _layers(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """weight name -> (weight, bias) for every layer whose weight (>= 2-D) and bias are both named."""
    pairs = {}
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        bias = f"{prefix}.bias" if prefix else "bias"
        if leaf == "weight" and len(shape) >= 2 and shapes.get(bias) == (shape[0],):
            pairs[name] = (name, bias)
    return pairs


def _affine_order(d_out: int, d_in: int) -> torch.Tensor:
    """Indices into [vec(W), b] (row-major W, laplace-torch's order) giving vec([W | b])."""
    columns = torch.arange(d_out * d_in).reshape(d_out, d_in)
    bias = d_out * d_in + torch.arange(d_out)[:, None]
    return torch.cat([columns, bias], dim=1).reshape(-1)


class KFAC(Posterior):
    """A Kronecker-factored Gaussian posterior, per layer.

    ``factors`` maps a weight's name to ``(B, A)``: the output factor B
    (Dout, Dout) and the input factor A (Din, Din), so that Cov(vec W) = B kron A
    with vec row-major over W as a (Dout, Din) matrix (a conv kernel flattened
    to (Cout, Cin*k*k), as laplace-torch does). A vector parameter such as a
    bias maps to ``(C,)``, its own full covariance. The Kronecker product is
    never formed. ``shapes`` gives the shape of parameters that are not
    (Dout, Din) matrices (conv kernels), for :meth:`to_diagonal`.

    :meth:`from_eigen` builds the exact posterior laplace-torch fits
    (eigen-decomposed factors plus a prior precision).
    """

    def __init__(self, factors: Mapping[str, Sequence[torch.Tensor]],
                 shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        entries = {}
        for name, pair in factors.items():
            pair = tuple(pair)
            if len(pair) == 2:
                out_factor, in_factor = (_checked_covariance(name, f) for f in pair)
                entries[name] = ParameterCovariance("param_kfac", (out_factor, in_factor))
            elif len(pair) == 1:
                entries[name] = ParameterCovariance("param_dense", (_checked_covariance(name, pair[0]),))
            else:
                raise PosteriorMismatchError(
                    f"KFAC factors of parameter '{name}': give (B, A) for a weight or (C,) for a vector, "
                    f"got {len(pair)} tensors"
                )
        self._entries = _with_shapes(entries, shapes)

    @classmethod
    def from_eigen(
        cls,
        eigen: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
        prior_precision: float | torch.Tensor | Mapping[str, float | torch.Tensor],
        scale: float | torch.Tensor = 1.0,
        *,
        damping: bool = False,
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> KFAC:
        """The posterior with precision h (Q_B L_B Q_B^T) kron (Q_A L_A Q_A^T) + delta I.

        ``eigen`` maps a weight to ``[(Q_B, l_B), (Q_A, l_A)]`` (output factor
        first) and a vector parameter to ``[(Q, l)]``; ``prior_precision`` is
        delta, one scalar or one per parameter; ``scale`` is h (laplace-torch:
        ``1 / sigma_noise**2 / temperature``). In the rotated basis
        W~ = Q_B^T W Q_A the entries are independent with variances
        1 / (h lB_k lA_i + delta): that is what the rules use, exactly.
        ``damping=True`` reproduces laplace-torch's ``damping=True`` posterior,
        1 / ((sqrt(h) lB_k + sqrt(delta)) (sqrt(h) lA_i + sqrt(delta))).
        """
        entries = {}
        h = torch.as_tensor(scale, dtype=torch.float64)
        priors = per_parameter(prior_precision, list(eigen), "prior precision")
        for name, pairs in eigen.items():
            delta = torch.tensor(priors[name], dtype=torch.float64)
            vectors = [_checked(name, q, "eigenvectors") for q, _ in pairs]
            values = [_checked(name, l, "eigenvalues").to(torch.float64) for _, l in pairs]
            if len(values) == 2:
                if damping:
                    precision = torch.outer(h.sqrt() * values[0] + delta.sqrt(), h.sqrt() * values[1] + delta.sqrt())
                else:
                    precision = h * torch.outer(values[0], values[1]) + delta
                rotated = _inverse_positive(name, precision).to(vectors[0].dtype)
                entries[name] = ParameterCovariance("param_kfac_eig", (vectors[0], vectors[1], rotated))
            elif len(values) == 1:
                inverse = _inverse_positive(name, h * values[0] + delta).to(vectors[0].dtype)
                q = vectors[0]
                entries[name] = ParameterCovariance("param_dense", ((q * inverse) @ q.t(),))
            else:
                raise PosteriorMismatchError(
                    f"KFAC eigen-decomposition of parameter '{name}': give two (Q, l) pairs for a weight "
                    f"or one for a vector, got {len(values)}"
                )
        posterior = cls.__new__(cls)
        posterior._entries = _with_shapes(entries, shapes)
        posterior._prior_form = lambda prior: cls.from_eigen(eigen, prior, scale, damping=damping, shapes=shapes)
        posterior.prior_precision = prior_precision
        return posterior

    def _scaled(self, scales: Mapping[str, float]) -> KFAC:
        posterior = KFAC.__new__(KFAC)
        posterior._entries = _scaled_entries(self._entries, scales)
        return posterior

    def parameter_names(self) -> list[str]:
        return list(self._entries)

    def covariance(self, name: str) -> ParameterCovariance:
        return self._entries[name]

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        for name, cov in self._entries.items():
            shape = _require(name, parameters)
            if cov.kind == "param_dense":
                expected = (int(torch.Size(shape).numel()),) * 2
                got = tuple(cov.tensors[0].shape)
            else:
                expected = _matrix_shape(shape) if len(shape) >= 2 else None
                got = (cov.tensors[0].shape[0], cov.tensors[1].shape[0])
            if expected != got:
                raise PosteriorMismatchError(
                    f"KFAC factors of parameter '{name}' have sizes {got}, but the parameter of shape "
                    f"{shape} needs {expected}"
                )
            if cov.shape is not None and cov.shape != shape:
                raise PosteriorMismatchError(f"KFAC of parameter '{name}' is for shape {cov.shape}, the parameter has {shape}")

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "KFAC", "entries": _entries_state(self._entries, prefix, tensors)}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> KFAC:
        posterior = cls.__new__(cls)
        posterior._entries = _entries_from_state(state["entries"], tensors)
        return posterior

    def __repr__(self) -> str:
        return f"KFAC({len(self._entries)} parameters)"


def _inverse_positive(name: str, precision: torch.Tensor) -> torch.Tensor:
    if (precision <= 0).any():
        raise PosteriorMismatchError(
            f"posterior precision of parameter '{name}' has non-positive eigenvalues "
            f"(min {precision.min().item():.3g}); add a positive prior precision"
        )
    return precision.reciprocal()


def _with_shapes(entries: dict[str, ParameterCovariance],
                 shapes: Mapping[str, Sequence[int]] | None) -> dict[str, ParameterCovariance]:
    """Attach the parameter shape each entry's tensors do not show."""
    shaped = {}
    for name, cov in entries.items():
        if shapes is not None and name in shapes:
            shape = tuple(shapes[name])
        elif cov.kind == "param_dense":
            shape = (cov.tensors[0].shape[0],)
        else:
            shape = (cov.tensors[0].shape[0], cov.tensors[1].shape[0])
        shaped[name] = ParameterCovariance(cov.kind, cov.tensors, shape)
    return shaped


class Dense(Posterior):
    """Full covariance blocks: one per parameter, or one per layer over its weight and bias jointly.

    ``blocks`` maps a parameter name, or a ``(weight_name, bias_name)`` pair of
    one layer, to the covariance (n, n) over the concatenated row-major vec
    (weight first, laplace-torch's order). ``shapes`` maps every named
    parameter to its shape (``dict(model.named_parameters())`` works). The cost
    grows as n^2 per layer: meant for small layers such as a last layer.
    """

    def __init__(self, blocks: Mapping[str | tuple[str, str], torch.Tensor],
                 shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> None:
        self._shapes = {n: tuple(s.shape if isinstance(s, torch.Tensor) else s) for n, s in shapes.items()}
        self._entries: dict[str, ParameterCovariance] = {}
        for key, cov in blocks.items():
            names = (key,) if isinstance(key, str) else tuple(key)
            for name in names:
                if name not in self._shapes:
                    raise PosteriorMismatchError(f"Dense: no shape given for parameter '{name}'")
                if name in self._entries:
                    raise PosteriorMismatchError(f"Dense: parameter '{name}' appears in two blocks")
            size = sum(int(torch.Size(self._shapes[n]).numel()) for n in names)
            cov = _checked_covariance(names[0], cov, size)
            self._entries.update(self._block(names, cov))

    def _block(self, names: tuple[str, ...], cov: torch.Tensor) -> dict[str, ParameterCovariance]:
        if len(names) == 1:
            shape = self._shapes[names[0]]
            tensors = (cov.reshape(*_matrix_shape(shape), *_matrix_shape(shape)),) if len(shape) >= 2 else (cov,)
            return {names[0]: ParameterCovariance("param_dense", tensors, shape)}
        weight, bias = names
        w_shape = self._shapes[weight]
        d_out, d_in = _matrix_shape(w_shape)
        if len(names) != 2 or len(w_shape) < 2 or self._shapes[bias] != (d_out,):
            raise PosteriorMismatchError(
                f"Dense: a joint block must be (weight, bias) of one layer, got {names} with shapes "
                f"{[self._shapes[n] for n in names]}"
            )
        order = _affine_order(d_out, d_in)
        joint = cov[order][:, order].reshape(d_out, d_in + 1, d_out, d_in + 1)
        return {
            weight: ParameterCovariance("param_dense_affine", (joint,), w_shape),
            bias: ParameterCovariance(AFFINE_BIAS, (joint,), self._shapes[bias]),
        }

    @classmethod
    def from_flat(cls, covariance: torch.Tensor, shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> Dense:
        """Per-layer blocks of one covariance over all ``shapes`` (in order, each vec row-major).

        Each layer's weight and bias keep their cross-covariance; covariance
        between different layers is dropped, because fxstream propagates layers
        independently (the local Gaussian approximation).
        """
        shapes = {n: tuple(s.shape if isinstance(s, torch.Tensor) else s) for n, s in shapes.items()}
        size = sum(int(torch.Size(s).numel()) for s in shapes.values())
        covariance = _checked_covariance("<all>", covariance, size)
        offsets, start = {}, 0
        for name, shape in shapes.items():
            offsets[name] = start
            start += int(torch.Size(shape).numel())
        layers = _layers(shapes)
        in_layer = {b for _, b in layers.values()}
        blocks = {}
        for name in shapes:
            if name in in_layer:
                continue
            names = layers.get(name, (name,))
            index = torch.cat([torch.arange(offsets[n], offsets[n] + int(torch.Size(shapes[n]).numel())) for n in names])
            blocks[names if len(names) == 2 else name] = covariance[index][:, index]
        return cls(blocks, shapes)

    def parameter_names(self) -> list[str]:
        return list(self._entries)

    def covariance(self, name: str) -> ParameterCovariance:
        return self._entries[name]

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        _check_shapes({n: self._shapes[n] for n in self._entries}, parameters, "covariance")

    def _scaled(self, scales: Mapping[str, float]) -> Dense:
        posterior = Dense.__new__(Dense)
        posterior._shapes = dict(self._shapes)
        posterior._entries = _scaled_entries(self._entries, scales)
        return posterior

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "Dense", "shapes": {name: list(shape) for name, shape in self._shapes.items()},
                "entries": _entries_state(self._entries, prefix, tensors)}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> Dense:
        posterior = cls.__new__(cls)
        posterior._shapes = {name: tuple(shape) for name, shape in state["shapes"].items()}
        posterior._entries = _entries_from_state(state["entries"], tensors)
        return posterior

    def __repr__(self) -> str:
        return f"Dense({len(self._entries)} parameters)"


class LowRank(Posterior):
    """Diagonal plus low rank: Cov = diag(d) + U U^T over a set of parameters (SWAG-style).

    ``diagonal`` maps parameter names to d (the parameter's shape);
    ``factors`` maps the same names to U (R, *shape), the same rank R for all:
    column r of U is the concatenation of ``factors[name][r]``. Within a layer
    the low-rank part couples weight and bias exactly; between layers the
    coupling is dropped (fxstream propagates layers independently).
    """

    def __init__(self, diagonal: Mapping[str, torch.Tensor], factors: Mapping[str, torch.Tensor]) -> None:
        if set(diagonal) != set(factors):
            raise PosteriorMismatchError(
                f"LowRank: diagonal and factors must name the same parameters; differ in "
                f"{sorted(set(diagonal) ^ set(factors))}"
            )
        self._diagonal = {n: _checked(n, d, "diagonal") for n, d in diagonal.items()}
        self._factors = {n: _checked(n, factors[n], "low-rank factor") for n in diagonal}
        ranks = {u.shape[0] for u in self._factors.values()}
        if len(ranks) > 1:
            raise PosteriorMismatchError(f"LowRank: every factor needs the same rank (first dim), got {sorted(ranks)}")
        for name, d in self._diagonal.items():
            if (d < 0).any():
                raise PosteriorMismatchError(f"diagonal of parameter '{name}' has negative entries")
            if tuple(self._factors[name].shape[1:]) != tuple(d.shape):
                raise PosteriorMismatchError(
                    f"low-rank factor of parameter '{name}' has shape {tuple(self._factors[name].shape)}; "
                    f"expected (rank, *{tuple(d.shape)})"
                )
        shapes = {n: tuple(d.shape) for n, d in self._diagonal.items()}
        self._layers = _layers(shapes)
        self._bias_of = {b: w for w, (_, b) in self._layers.items()}

    @classmethod
    def from_samples(cls, samples: Mapping[str, torch.Tensor], rank: int | None = None) -> LowRank:
        """SWAG's Gaussian from K weight samples (K, *shape) per parameter.

        Cov = 1/2 diag(sample variance) + 1/2 D D^T / (K - 1), with D the
        deviations of the last ``rank`` samples (default: all) from the sample
        mean. The posterior mean is the model's parameters: load the sample
        mean (the SWA solution) into the model before streamlining.
        """
        counts = {s.shape[0] for s in samples.values()}
        if len(counts) != 1 or counts.pop() < 2:
            raise PosteriorMismatchError("LowRank.from_samples needs the same number (>= 2) of samples per parameter")
        diagonal, factors = {}, {}
        for name, stack in samples.items():
            stack = _checked(name, stack, "samples")
            k = stack.shape[0]
            mean = stack.mean(0)
            diagonal[name] = 0.5 * stack.var(0, unbiased=False)
            recent = stack[-(rank or k):] - mean
            factors[name] = recent / (2 * (k - 1)) ** 0.5
        return cls(diagonal, factors)

    def parameter_names(self) -> list[str]:
        return list(self._diagonal)

    def covariance(self, name: str) -> ParameterCovariance:
        shape = tuple(self._diagonal[name].shape)
        weight = name if name in self._layers else self._bias_of.get(name)
        if weight is None:
            return ParameterCovariance("param_lowrank", (self._diagonal[name], self._factors[name]), shape)
        bias = self._layers[weight][1]
        d_out = self._diagonal[weight].shape[0]
        d = torch.cat([self._diagonal[weight].reshape(d_out, -1), self._diagonal[bias][:, None]], dim=1)
        u = self._factors[weight]
        u = torch.cat([u.reshape(u.shape[0], d_out, -1), self._factors[bias][:, :, None]], dim=2)
        kind = "param_lowrank_affine" if name == weight else AFFINE_BIAS
        return ParameterCovariance(kind, (d, u), shape)

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        _check_shapes({n: tuple(d.shape) for n, d in self._diagonal.items()}, parameters, "diagonal")

    def _scaled(self, scales: Mapping[str, float]) -> LowRank:
        return LowRank({n: d * scales[n] for n, d in self._diagonal.items()},
                       {n: u * scales[n] ** 0.5 for n, u in self._factors.items()})

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "LowRank",
                "diagonal": {n: _put(tensors, f"{prefix}{n}.diagonal", d) for n, d in self._diagonal.items()},
                "factors": {n: _put(tensors, f"{prefix}{n}.factor", u) for n, u in self._factors.items()}}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> LowRank:
        return cls({n: _get(tensors, k) for n, k in state["diagonal"].items()},
                   {n: _get(tensors, k) for n, k in state["factors"].items()})

    def __repr__(self) -> str:
        rank = next(iter(self._factors.values())).shape[0] if self._factors else 0
        return f"LowRank({len(self._diagonal)} parameters, rank {rank})"


class Mixed(Posterior):
    """Different structures for different layers in one posterior, e.g.
    ``Mixed(KFAC(...), Dense(...), Diagonal(...))`` over disjoint parameter sets."""

    def __init__(self, *parts: Posterior | Iterable[Posterior]) -> None:
        flat: list[Posterior] = []
        for part in parts:
            flat.extend([part] if isinstance(part, Posterior) else part)
        self.parts = tuple(flat)
        self._owner: dict[str, Posterior] = {}
        for part in self.parts:
            if not isinstance(part, Posterior):
                raise PosteriorMismatchError(f"Mixed takes fxstream posteriors, got {type(part).__name__}")
            for name in part.parameter_names():
                if name in self._owner:
                    raise PosteriorMismatchError(
                        f"parameter '{name}' is in two parts of a Mixed posterior "
                        f"({type(self._owner[name]).__name__} and {type(part).__name__})"
                    )
                self._owner[name] = part

    def parameter_names(self) -> list[str]:
        return list(self._owner)

    def covariance(self, name: str) -> ParameterCovariance:
        return self._owner[name].covariance(name)

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        for part in self.parts:
            part.validate(parameters)

    def _scaled(self, scales: Mapping[str, float]) -> Mixed:
        return Mixed(*(part._scaled({n: scales[n] for n in part.parameter_names()}) for part in self.parts))

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "Mixed", "parts": [part._state(f"{prefix}part{i}/", tensors)
                                           for i, part in enumerate(self.parts)]}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> Mixed:
        return cls(*(_from_state(part, tensors) for part in state["parts"]))

    def __repr__(self) -> str:
        return "Mixed(" + ", ".join(repr(p) for p in self.parts) + ")"


class Entries(Posterior):
    """Each parameter's covariance exactly as the rules consume it: a saved posterior of a type fxstream
    has no file structure for (what :meth:`Posterior.save` writes by default), a scaled one of such a
    type, and the buffers a streamlined model reads."""

    def __init__(self, entries: Mapping[str, ParameterCovariance]) -> None:
        self._entries = dict(entries)

    def parameter_names(self) -> list[str]:
        return list(self._entries)

    def covariance(self, name: str) -> ParameterCovariance:
        return self._entries[name]

    def validate(self, parameters: Mapping[str, torch.Tensor]) -> None:
        _check_shapes({name: tuple(marginal_variance(cov.kind, cov.tensors, cov.shape).shape)
                       for name, cov in self._entries.items()}, parameters, "covariance")

    def _state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"type": "Entries", "entries": _entries_state(self._entries, prefix, tensors)}

    @classmethod
    def _from_state(cls, state: dict, tensors: Mapping[str, torch.Tensor]) -> Entries:
        return cls(_entries_from_state(state["entries"], tensors))

    def __repr__(self) -> str:
        return f"Posterior({len(self._entries)} parameters, saved covariances)"


#: How each tensor of a covariance kind changes when the covariance is multiplied by s:
#: "var" times s, "std" times sqrt(s), None unchanged.
_SCALING: dict[str, tuple[str | None, ...]] = {
    "param_diag": ("var",), "param_dense": ("var",), "param_dense_affine": ("var",),
    "param_kfac": ("var", None), "param_kfac_eig": (None, None, "var"),
    "param_lowrank": ("var", "std"), "param_lowrank_affine": ("var", "std"),
    AFFINE_BIAS: ("var", "std"),  # its weight's joint block: (cov,) dense, (d, U) low rank
}


def _scaled_entries(entries: Mapping[str, ParameterCovariance], scales: Mapping[str, float]) -> dict[str, ParameterCovariance]:
    """Every covariance times its parameter's scale; a tensor two parameters share (a layer's joint
    weight-bias block) is scaled once and stays shared, so both need the same scale."""
    done: dict[int, tuple[float, torch.Tensor]] = {}
    scaled = {}
    for name, cov in entries.items():
        s = scales[name]
        tensors = []
        for tensor, role in zip(cov.tensors, _SCALING[cov.kind]):
            if role is None:
                tensors.append(tensor)
                continue
            if id(tensor) in done:
                if done[id(tensor)][0] != s:
                    raise PosteriorMismatchError(
                        f"parameter '{name}' shares its covariance block with another parameter of its layer, "
                        f"which has scale {done[id(tensor)][0]} and it {s}; give the layer one scale"
                    )
            else:
                done[id(tensor)] = (s, tensor * (s if role == "var" else s ** 0.5))
            tensors.append(done[id(tensor)][1])
        scaled[name] = ParameterCovariance(cov.kind, tuple(tensors), cov.shape)
    return scaled


FILE_FORMAT = "fxstream.posterior"
FILE_VERSION = 1
_TYPES = {"Diagonal": Diagonal, "KFAC": KFAC, "Dense": Dense, "LowRank": LowRank, "Mixed": Mixed,
          "Entries": Entries}


def _put(tensors: dict[str, torch.Tensor], key: str, tensor: torch.Tensor) -> str:
    """Store a copy of ``tensor`` (on the CPU, contiguous, owning its memory) under a key not taken yet."""
    unique, n = key, 1
    while unique in tensors:
        unique, n = f"{key}~{n}", n + 1
    tensors[unique] = tensor.detach().to("cpu", copy=True).contiguous()
    return unique


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise FxstreamError(f"the posterior file names tensor '{key}', which it does not hold; the file is damaged")
    return tensors[key]


def _entries_state(entries: Mapping[str, ParameterCovariance], prefix: str,
                   tensors: dict[str, torch.Tensor]) -> list[dict]:
    """Covariances as the rules consume them; a tensor shared by two parameters (a layer's joint
    weight-bias block) is stored once and shared again on loading."""
    stored: dict[int, str] = {}
    state = []
    for name, cov in entries.items():
        keys = []
        for i, tensor in enumerate(cov.tensors):
            if id(tensor) not in stored:
                stored[id(tensor)] = _put(tensors, f"{prefix}{name}.{cov.kind.removeprefix('param_')}.{i}", tensor)
            keys.append(stored[id(tensor)])
        state.append({"name": name, "kind": cov.kind, "tensors": keys,
                      "shape": None if cov.shape is None else list(cov.shape)})
    return state


def _entries_from_state(state: list[dict], tensors: Mapping[str, torch.Tensor]) -> dict[str, ParameterCovariance]:
    return {entry["name"]: ParameterCovariance(entry["kind"], tuple(_get(tensors, k) for k in entry["tensors"]),
                                               None if entry["shape"] is None else tuple(entry["shape"]))
            for entry in state}


def _from_state(state: dict, tensors: Mapping[str, torch.Tensor]) -> Posterior:
    kind = state.get("type") if isinstance(state, dict) else None
    if kind not in _TYPES:
        raise FxstreamError(f"the posterior file holds a structure '{kind}' this version of fxstream does not know; "
                            f"it reads {sorted(_TYPES)}")
    return _TYPES[kind]._from_state(state, tensors)


def is_posterior_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file (an 8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and int.from_bytes(head[:8], "little") > 0 and head[8:9] == b"{"


def load_posterior(path: str | os.PathLike, model: torch.nn.Module | None = None, *,
                   device: str | torch.device = "cpu") -> Posterior:
    """The posterior :meth:`Posterior.save` wrote to ``path``, with its tensors on ``device``.

    With ``model``, the posterior is checked against its parameters: a name the model lacks or a
    shape that does not fit raises :class:`PosteriorMismatchError` naming the parameter.
    """
    from safetensors import SafetensorError, safe_open

    if not is_posterior_file(path):
        raise FxstreamError(f"'{os.fspath(path)}' is not a posterior file: fxstream writes them with "
                            "posterior.save(path) (safetensors)")
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (OSError, SafetensorError) as error:
        raise FxstreamError(f"cannot read the posterior file '{os.fspath(path)}': {error}") from None
    if metadata.get("format") != FILE_FORMAT or "structure" not in metadata:
        raise FxstreamError(f"'{os.fspath(path)}' is a safetensors file but not an fxstream posterior (its metadata "
                            "has no fxstream structure); write one with posterior.save(path)")
    if int(metadata.get("version", 0)) > FILE_VERSION:
        raise FxstreamError(f"the posterior file '{os.fspath(path)}' has format version {metadata['version']}; this "
                            f"fxstream reads up to version {FILE_VERSION}: upgrade fxstream")
    posterior = _from_state(json.loads(metadata["structure"]), tensors)
    if model is not None:
        posterior.validate(dict(model.named_parameters()))
    return posterior
