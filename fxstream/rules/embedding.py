"""Embedding lookups: indices are deterministic, a Bayesian table contributes the selected rows.

diag: var_out[..., d] = var_W[index, d]. full: two positions of one sample that
read the same row share those weights, so Cov[(t, d), (t', d')] =
[index_t = index_t'] [d = d'] var_W[index_t, d]. A table used again elsewhere
(a tied lm_head) is one posterior entry; each use sees the same variances.
Indices that do not depend on the input (position ids 0..T-1) select distinct
rows, so the result is still a parameter with independent entries.
"""

from __future__ import annotations

import torch

from .linearise import routed_variance
from .registry import RuleCall, register

aten = torch.ops.aten


def _deterministic_indices(call: RuleCall) -> str | None:
    if call.cov(1) is not None:
        return "embedding indices must be deterministic (integers carry no covariance); look up by integer indices"
    return None


def embedding_math(weight: torch.Tensor, indices: torch.Tensor, *unused) -> torch.Tensor:
    """The lookup as indexing, for forward-mode AD in the table: the kernel's own JVP, batched by vmap,
    reads storage offsets, which a lowered graph's symbolic sizes do not have (exact joins push a
    tied table's covariance through it). The remaining arguments change only the backward."""
    return weight[indices]


@register(aten.embedding.default, param_passthrough=True, supports=_deterministic_indices,
          differentiable=embedding_math)
def embedding(call: RuleCall) -> torch.Tensor:
    """The variances of the looked-up rows (same rows, same weights: correlated in full)."""
    if call.structure != "full":
        return routed_variance(call)
    indices = call.arg(1)
    batch = indices.shape[0]
    rows = indices.reshape(batch, -1)
    selected = call.cov(0)[rows]  # (B, T, D)
    same_row = (rows[:, :, None] == rows[:, None, :]).to(selected.dtype)  # (B, T, T)
    dim = selected.shape[-1]
    cov = same_row[:, :, None, :, None] * torch.diag_embed(selected)[:, :, :, None, :]
    n = rows.shape[1] * dim
    return cov.reshape(batch, n, n)
