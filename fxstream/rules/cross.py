"""Cross-covariances between activations, for exact joins (option ``joins="exact"``, full activations).

Where two paths from one uncertain tensor meet again (a residual add, Q/K/V from
one input, a gate times its up projection), the op's rule treats its inputs as
independent. With ``joins="exact"`` the pair pass also carries, for every new
activation t and every uncertain activation u still to be read later,

    Cov(t, u) = sum_i J_i Cov(x_i, u)

(J_i the Jacobian of t's op in its input x_i at the means; independent weights
add nothing), and adds at each op with correlated inputs x_p, x_q

    J_p Cov(x_p, x_q) J_q^T + (J_p Cov(x_p, x_q) J_q^T)^T

to the rule's covariance. Under first-order rules (products, norm and attention
"linearised") every covariance is then the linearisation of the whole network,
J Sigma J^T, for any branching. Cross-covariances are per sample, (B, N_t, N_u).
A parameter read by more than one op is such a u too, with no batch dim: its
own covariance (N, N) serves every sample, and its Jacobian meets each sample's
columns separately.
"""

from __future__ import annotations

import torch
from torch.func import vmap

from .linearise import op_function, push_forward
from .registry import Path, RuleCall


Pick = int | None  # the output of a multi-output op the covariance belongs to (None: the op has one)


def _call(op, args: tuple, kwargs: dict, out) -> RuleCall:
    return RuleCall(op, args, kwargs, (), {}, (), {}, out, "full")


def _mean_at(call: RuleCall, path: Path) -> torch.Tensor:
    return dict(call.tensors())[path]


def apply_jacobian(call: RuleCall, path: Path, pick: Pick, cross: torch.Tensor,
                   per_sample: tuple[Path, ...] | None = None) -> torch.Tensor:
    """J X for X = Cov(x, u), J the Jacobian of the op's output in input ``path``: (B, N_t, N_u).

    For an activation x, X is per sample (B, N_x, N_u). For a parameter x (no batch dim) read by more
    than one op, ``per_sample`` gives the paths of the op's inputs that carry the batch, and X is either
    its own covariance (N_x, N_x), the same for every sample, or its covariance with sample b's u
    (B, N_x, N_u), which meets sample b's Jacobian only: the op then runs once per sample (vmap).
    """
    mean = _mean_at(call, path)
    n_u = cross.shape[-1]
    output = None if pick is None else (lambda out: out[pick])
    if per_sample is not None and cross.dim() == 3:
        batch, tensors = cross.shape[0], dict(call.tensors())
        samples = {p: tensors[p].reshape(batch, -1, *tensors[p].shape[1:])  # (B, k, ...)
                   for p in per_sample if p in tensors}

        def one_sample(sample: dict, columns: torch.Tensor) -> torch.Tensor:
            fn, context = op_function(call, path, output, sample)
            return push_forward(fn, mean, columns, context)

        pushed = vmap(one_sample)(samples, cross.transpose(1, 2).reshape(batch, n_u, *mean.shape))
        return pushed.reshape(batch, n_u, -1).transpose(1, 2)
    columns = cross.t() if cross.dim() == 2 else cross.permute(2, 0, 1)
    fn, context = op_function(call, path, output)
    pushed = push_forward(fn, mean, columns.reshape(n_u, *mean.shape), context)
    return pushed.reshape(n_u, pushed.shape[1], -1).permute(1, 2, 0)  # (N_u, *out) -> (B, N_t, N_u)


Operand = tuple[Path, tuple[Path, ...] | None]
"""An input's path in the op's arguments, and for a parameter the paths of the inputs that carry the batch
(None for an activation)."""


def cross_covariance(op, args: tuple, kwargs: dict, out, pick: Pick,
                     terms: list[tuple[Operand, torch.Tensor]]) -> torch.Tensor:
    """Cov(t, u) = sum_i J_i Cov(x_i, u) over the op's inputs x_i correlated with u."""
    call = _call(op, args, kwargs, out)
    total = None
    for (path, per_sample), cross in terms:
        term = apply_jacobian(call, path, pick, cross, per_sample)
        total = term if total is None else total + term
    return total


def joint_terms(op, args: tuple, kwargs: dict, out, pick: Pick, cov: torch.Tensor,
                pairs: list[tuple[Operand, Operand, torch.Tensor]]) -> torch.Tensor:
    """The rule's covariance ``cov`` plus J_p Cov(x_p, x_q) J_q^T and its transpose for each correlated pair."""
    call = _call(op, args, kwargs, out)
    for (path_p, per_sample_p), (path_q, per_sample_q), cross in pairs:
        left = apply_jacobian(call, path_p, pick, cross, per_sample_p)  # J_p X: (B, N_t, N_q)
        term = apply_jacobian(call, path_q, pick, left.transpose(1, 2), per_sample_q)  # J_q (J_p X)^T
        cov = cov + term + term.transpose(1, 2)
    return cov
