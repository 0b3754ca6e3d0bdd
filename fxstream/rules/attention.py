"""Fused attention: ``scaled_dot_product_attention`` (causal and padding masks, GQA).

O = P V with P = softmax(scale * Q K^T + mask), per batch and head; tokens of
an activation are treated as independent (diagonal covariance).

- ``attention="paper"`` (default): P from the mean queries, keys and additive
  mask, only the value uncertainty propagates: var_O[t] = sum_s P_ts^2 var_V[s].
- ``attention="linearised"``: O linearised at the means in Q, K, V and an
  uncertain additive mask (T5's relative position bias, a learned ALiBi)
  together (independent inputs). With G_t = scale * sum_u P_tu (V_u - O_t) k_u^T
  (the Jacobian of O_t in q_t), the query term is sum_d G_ted^2 var_q[t, d], the
  key term is scale^2 sum_r P_tr^2 (V_re - O_te)^2 sum_d q_td^2 var_k[r, d], and
  the mask term sum_r P_tr^2 (V_re - O_te)^2 var_mask[t, r] (the mask enters the
  logits unscaled).

The hand-written form (matmul, softmax, matmul) goes through the matmul and
softmax rules; :mod:`fxstream.rules.patterns` holds its softmax at the mean
under the paper's rule.
"""

from __future__ import annotations

import math

import torch

from .linearise import batch_size, context_function, factor_to_full, parameter_factor, sandwich
from .registry import RuleCall, register

aten = torch.ops.aten

QUERY, KEY, VALUE, MASK = 0, 1, 2, 3


def _heads_repeated(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    return tensor.repeat_interleave(heads // tensor.shape[-3], dim=-3)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask, causal: bool, scale: float | None) -> torch.Tensor:
    """P = softmax(scale * q k^T + mask) as SDPA computes it (bool mask: True keeps). The scale multiplies
    by the Scalar overload: forward-mode AD of the Tensor one with a Python number reads concrete sizes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = aten.mul.Scalar(q @ k.transpose(-2, -1), scale)
    if causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, dropout: float = 0.0,
                   causal: bool = False, scale: float | None = None, **_) -> torch.Tensor:
    """SDPA written out in ATen math (GQA included), which forward-mode AD differentiates (the fused CPU
    kernels have no forward derivative). Takes SDPA's arguments; dropout must be 0 (eval)."""
    heads = q.shape[-3]
    return attention_probabilities(q, _heads_repeated(k, heads), mask, causal, scale) @ _heads_repeated(v, heads)


def _mask_cov(call: RuleCall):
    """The additive mask's covariance (or, in a capability check, its kind), positional or by keyword."""
    cov = call.cov(MASK)
    return call.kw_covs.get("attn_mask") if cov is None else cov


def _mask_kind(call: RuleCall):
    kind = call.kind(MASK)
    return call.kw_kinds.get("attn_mask") if kind is None else kind


def _read(call: RuleCall) -> tuple[int, ...]:
    """The arguments whose uncertainty the chosen ``attention`` option propagates."""
    return (QUERY, KEY, VALUE, MASK) if call.options["attention"] == "linearised" else (VALUE,)


def _attention_problem(call: RuleCall) -> str | None:
    if call.arg(4):
        return "attention dropout is random; call model.eval() before streamlining"
    read = _read(call)
    for index in (QUERY, KEY, VALUE):
        kind = call.kind(index)
        if index in read and isinstance(kind, str) and kind.startswith("param"):
            return ("scaled_dot_product_attention with a parameter as query, key or value is not supported; "
                    "leave that parameter out of the posterior")
    mask = call.arg(MASK)
    if MASK in read and call.structure == "full" and _mask_kind(call) == "full" \
            and (mask.dim() == 0 or mask.shape[0] != call.arg(QUERY).shape[0]):
        return ("full covariance of an uncertain attention mask shared across the batch is not supported; "
                "use activation_cov='diag'")
    return None


def _means(call: RuleCall) -> tuple:
    q, k, v, mask = (call.arg(i) for i in range(4))
    heads = q.shape[-3]
    k, v = _heads_repeated(k, heads), _heads_repeated(v, heads)
    return q, k, v, mask, bool(call.arg(5)), call.arg(6)


@register(aten.scaled_dot_product_attention.default, supports=_attention_problem, differentiable=attention_math,
          unread=lambda options: (QUERY, KEY, MASK) if options["attention"] == "paper" else ())
def scaled_dot_product_attention(call: RuleCall) -> torch.Tensor:
    """Output covariance of attention under the chosen ``attention`` option (see the module doc)."""
    linearised = call.options["attention"] == "linearised"
    q, k, v, mask, causal, scale = _means(call)
    if call.structure == "full":
        return _full(call, linearised)
    p = attention_probabilities(q, k, mask, causal, scale)
    var = torch.zeros_like(call.out)
    if call.cov(VALUE) is not None:
        var = var + p.square() @ _heads_repeated(call.cov(VALUE), q.shape[-3])
    if not linearised:
        return var
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    centred = v.unsqueeze(-3) - call.out.unsqueeze(-2)  # V_r - O_t: (..., T, S, E)
    if call.cov(QUERY) is not None:
        jacobian = scale * torch.einsum("...ts,...tse,...sd->...ted", p, centred, k)
        var = var + torch.einsum("...ted,...td->...te", jacobian.square(), call.cov(QUERY))
    weight = None
    if call.cov(KEY) is not None:
        var_k = _heads_repeated(call.cov(KEY), q.shape[-3])
        weight = scale**2 * p.square() * (q.square() @ var_k.transpose(-2, -1))
    if _mask_cov(call) is not None:
        masked = p.square() * _mask_cov(call)
        weight = masked if weight is None else weight + masked
    if weight is not None:
        var = var + torch.einsum("...ts,...tse->...te", weight, centred.square())
    return var


def _full(call: RuleCall, linearised: bool) -> torch.Tensor:
    """Per-sample J S J^T, summed over the uncertain inputs (only V under the paper's rule), through
    :func:`attention_math`."""
    q, k, v, mask = (call.arg(i) for i in range(4))
    causal, scale = bool(call.arg(5)), call.arg(6)

    def attention(q_, k_, v_, mask_):
        return attention_math(q_, k_, v_, mask_, 0.0, causal, scale)

    means = [q, k, v, mask]
    total = 0
    for index in _read(call):
        cov, kind = (_mask_cov(call), _mask_kind(call)) if index == MASK else (call.cov(index), call.kind(index))
        if cov is None:
            continue

        moved, context = context_function(lambda values: attention(*(values[i] for i in range(4))),
                                          dict(enumerate(means)), index)
        if kind == "param_diag":  # a parameter mask (T5's bias): J diag(v) J^T
            term = factor_to_full(parameter_factor(moved, means[index], cov, context), batch_size(call))
        else:
            term = sandwich(moved, means[index], cov, context)
        total = total + term
    return total
