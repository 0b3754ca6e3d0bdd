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
"""

from __future__ import annotations

import torch

from .linearise import push_forward
from .registry import Path, RuleCall


Pick = int | None  # the output of a multi-output op the covariance belongs to (None: the op has one)


def _call(op, args: tuple, kwargs: dict, out) -> RuleCall:
    return RuleCall(op, args, kwargs, (), {}, (), {}, out, "full")


def _input_fn(call: RuleCall, path: Path, pick: Pick):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = call.call_with({path: x})
        return out if pick is None else out[pick]

    return fn


def _mean_at(call: RuleCall, path: Path) -> torch.Tensor:
    return dict(call.tensors())[path]


def apply_jacobian(call: RuleCall, path: Path, pick: Pick, cross: torch.Tensor) -> torch.Tensor:
    """J X for X = Cov(x, u) (B, N_x, N_u), J the Jacobian of the op's output in input ``path``: (B, N_t, N_u)."""
    mean = _mean_at(call, path)
    batch, n_u = cross.shape[0], cross.shape[-1]
    columns = cross.permute(2, 0, 1).reshape(n_u, *mean.shape)
    pushed = push_forward(_input_fn(call, path, pick), mean, columns)  # (N_u, *out)
    return pushed.reshape(n_u, batch, -1).permute(1, 2, 0)


def cross_covariance(op, args: tuple, kwargs: dict, out, pick: Pick,
                     terms: list[tuple[Path, torch.Tensor]]) -> torch.Tensor:
    """Cov(t, u) = sum_i J_i Cov(x_i, u) over the op's inputs x_i correlated with u."""
    call = _call(op, args, kwargs, out)
    total = None
    for path, cross in terms:
        term = apply_jacobian(call, path, pick, cross)
        total = term if total is None else total + term
    return total


def joint_terms(op, args: tuple, kwargs: dict, out, pick: Pick, cov: torch.Tensor,
                pairs: list[tuple[Path, Path, torch.Tensor]]) -> torch.Tensor:
    """The rule's covariance ``cov`` plus J_p Cov(x_p, x_q) J_q^T and its transpose for each correlated pair."""
    call = _call(op, args, kwargs, out)
    for path_p, path_q, cross in pairs:
        left = apply_jacobian(call, path_p, pick, cross)  # J_p X: (B, N_t, N_q)
        term = apply_jacobian(call, path_q, pick, left.transpose(1, 2))  # J_q (J_p X)^T: (B, N_t, N_t)
        cov = cov + term + term.transpose(1, 2)
    return cov
