"""Shared pieces of the rules: local linearisation of an op at its mean.

Full activation covariance is stored per sample, flattened: a tensor of shape
(B, N, N) where B is the batch size and N the number of elements per sample.
The mean may have any shape whose leading (slowest) index runs over the batch,
e.g. (B, T, D) or the (B*T, D) view of it. Diagonal covariance ("diag") is a
variance tensor with the mean's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp, vmap

from .registry import Path, RuleCall

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def push_forward(fn: Callable[..., torch.Tensor], mean: torch.Tensor, tangents: torch.Tensor,
                 context: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """J @ t for a stack of tangents (R, *mean.shape), J the Jacobian of ``fn(x, *context)`` in x at mean.

    The ``context`` tensors (an op's other floating-point inputs) enter the JVP as duals with zero
    tangents: the forward-mode derivative of a binary op with an operand that is no dual (add, mul,
    addmm) reads concrete sizes, which would fix a lowered graph's batch size and sequence length.
    Every primal and the tangents are made contiguous: forward AD gives a tangent whose layout differs
    from its primal's a fresh buffer of the primal's layout, which with symbolic sizes it cannot
    allocate, and it cannot make a dual of a tensor whose elements share memory (an expanded mask:
    Mistral's sliding window).
    """
    primals = tuple(t.contiguous() for t in (mean, *context))
    tangents = tangents.contiguous()

    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(fn, primals, (t, *(torch.zeros_like(c) for c in primals[1:])))[1]

    return vmap(one)(tangents)


def context_function(fn: Callable[[dict], torch.Tensor], values: dict, key) -> tuple[
        Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``fn`` of named inputs as ``f(x, *context)`` of the input ``key`` and the other floating-point
    tensors among ``values``, for :func:`push_forward`.
    """
    others = tuple(k for k, value in values.items() if k != key and isinstance(value, torch.Tensor)
                   and torch.is_floating_point(value))

    def f(x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return fn({**values, key: x, **dict(zip(others, context))})

    return f, tuple(values[k] for k in others)


def op_function(call: RuleCall, path: Path, output: TensorFn | None = None,
                fixed: dict[Path, torch.Tensor] | None = None) -> tuple[Callable[..., torch.Tensor],
                                                                       tuple[torch.Tensor, ...]]:
    """The op as ``f(x, *context)`` of its input at ``path`` (see :func:`context_function`); ``fixed``
    replaces some inputs' means, ``output`` picks one of several outputs."""
    pick = output or (lambda out: out)
    return context_function(lambda values: pick(call.call_with(values)), {**dict(call.tensors()), **(fixed or {})},
                            path)


def sandwich(fn: Callable[..., torch.Tensor], mean: torch.Tensor, cov: torch.Tensor,
             context: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """J S J^T per sample, for full covariance S (B, N, N) of fn's input at ``mean`` (``context``: see
    :func:`push_forward`)."""
    batch, n = cov.shape[0], cov.shape[-1]
    columns = cov.permute(2, 0, 1).reshape(n, *mean.shape)
    left = push_forward(fn, mean, columns, context)  # (N, *out): column c is J S[:, :, c]
    n_out = left[0].numel() // batch
    rows = left.reshape(n, batch, n_out).permute(2, 1, 0).reshape(n_out, *mean.shape)
    both = push_forward(fn, mean, rows, context)  # (N_out, *out)
    return both.reshape(n_out, batch, n_out).permute(1, 2, 0)


def linear_sandwich(fn: TensorFn, cov: torch.Tensor, sample_shape: torch.Size) -> torch.Tensor:
    """J S J^T per sample for a linear ``fn`` that maps each sample of a batch on its own (a convolution).

    The covariance's columns are folded into the batch and ``fn`` runs on them
    directly: no forward-mode AD, whose batching rule for a convolution reads
    concrete sizes (that would fix the batch size of a lowered graph).
    """
    batch, n = cov.shape[0], cov.shape[-1]
    left = fn(cov.transpose(1, 2).reshape(batch * n, *sample_shape)).reshape(batch, n, -1)  # [b, c] = J S_b[:, c]
    m = left.shape[-1]
    both = fn(left.transpose(1, 2).reshape(batch * m, *sample_shape)).reshape(batch, m, m)
    return both.transpose(1, 2)


def parameter_factor(fn: Callable[..., torch.Tensor], mean: torch.Tensor, variance: torch.Tensor,
                     context: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Square-root factor (P, *out) of J diag(variance) J^T for a parameter with diagonal variance."""
    p = variance.numel()
    basis = torch.diag_embed(variance.reshape(-1).sqrt()).reshape(p, *mean.shape)
    return push_forward(fn, mean, basis, context)


def factor_to_full(factor: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample covariance sum_r f_r f_r^T from a factor (R, *out) whose outputs are batch-major."""
    r = factor.shape[0]
    flat = factor.reshape(r, batch, -1)
    return torch.einsum("rbn,rbm->bnm", flat, flat)


def full_to_diag(cov: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The per-element variances of a full covariance, in the mean's shape."""
    return cov.diagonal(dim1=-2, dim2=-1).reshape(shape)


def diag_to_full(var: torch.Tensor, batch: int) -> torch.Tensor:
    """A full per-sample covariance with the given variances on its diagonal."""
    return torch.diag_embed(var.reshape(batch, -1))


def batch_size(call: RuleCall) -> int:
    """The batch size B of a full-covariance call.

    The pair pass hands every full-structure rule the leading size of the
    model's input (a view such as GPT-2's (B*T, D) hides it from the op's own
    shapes); otherwise it is read off an activation covariance, or the output.
    """
    if call.batch is not None:
        return call.batch
    for _, _, cov, kind in call.uncertain():
        if kind == "full":
            return cov.shape[0]
    out = call.out[0] if isinstance(call.out, (list, tuple)) else call.out
    return out.shape[0]


def linearised_full(call: RuleCall, output: TensorFn | None = None) -> torch.Tensor:
    """Full output covariance of the op linearised at the means, inputs independent.

    Each uncertain activation contributes J S J^T, each uncertain parameter
    J diag(v) J^T. ``output`` picks a tensor from a multi-output op. An empty
    input (Phi-3's pass-through half of a rotary embedding that covers the
    whole head) contributes nothing.
    """
    pick = output or (lambda out: out)
    batch = batch_size(call)
    total = None
    for path, mean, cov, kind in call.uncertain():
        if mean.numel() == 0:
            continue
        fn, context = op_function(call, path, pick)
        if kind == "full":
            term = sandwich(fn, mean, cov, context)
        elif kind == "param_diag":
            term = factor_to_full(parameter_factor(fn, mean, cov, context), batch)
        else:  # a rule that hands other parameter kinds here declines them in its capability check
            raise NotImplementedError(f"{call.op}: linearised_full has no term for a '{kind}' posterior")
        total = term if total is None else total + term
    if total is None:
        n = pick(call.out).numel() // batch
        return pick(call.out).new_zeros(batch, n, n)
    return total


def zero_covariance(call: RuleCall) -> torch.Tensor:
    """The covariance of an output that carries no uncertainty, in the call's structure."""
    if call.structure == "full":
        batch = batch_size(call)
        n = call.out.numel() // batch
        return call.out.new_zeros(batch, n, n)
    return torch.zeros_like(call.out)


def routed_variance(call: RuleCall, output: TensorFn | None = None) -> torch.Tensor:
    """Diagonal rule for ops whose Jacobian entries are all 0 or 1 (shape ops, sums, routing).

    Such ops are linear in their floating-point inputs, and (J o J) v = J v, so
    the op applied to the variances (deterministic inputs as zeros) gives the
    output variances in one call of the op itself: no JVP, which in eager mode
    costs functorch's bookkeeping on every view of every layer.
    """
    pick = output or (lambda out: out)
    # A view of the mean (functionalization keeps aten.view where the model wrote reshape) needs the mean's
    # layout; a variance computed by a rule may be laid out otherwise (a transposed GEMM's result), so it follows
    # the mean's contiguity.
    replacements = {path: cov.contiguous() if mean.is_contiguous() and cov.shape == mean.shape else cov
                    for path, mean, cov, _ in call.uncertain()}
    for path, value in call.tensors():
        if path not in replacements and torch.is_floating_point(value):
            replacements[path] = torch.zeros_like(value)
    return pick(call.call_with(replacements))


def noise_product_full(act_cov: torch.Tensor, param: torch.Tensor, variance: torch.Tensor,
                       broadcast: TensorFn) -> torch.Tensor:
    """Per-sample covariance of (a - E a) * (p - E p) for activation a (full cov) and parameter p.

    ``broadcast`` maps the parameter to the activation's shape; the result is
    S_a o P, where P[i, j] = var(p_k) when elements i and j both read entry k.
    """
    factor = parameter_factor(broadcast, param, variance)
    return act_cov * factor_to_full(factor, act_cov.shape[0])


def elementwise_full(cov: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """J S J^T for an elementwise map with derivative ``slope`` (the mean's shape): S scaled by d_i d_j.

    One product, where a vmapped JVP would push every column of S through the map
    (and, for some ops such as GELU, fix the batch size when lowered).
    """
    flat = slope.reshape(cov.shape[0], -1)
    return cov * flat[:, :, None] * flat[:, None, :]


def derivative(fn: TensorFn, mean: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative g'(mean) of an elementwise function (contiguous mean: see :func:`push_forward`)."""
    mean = mean.contiguous()
    return jvp(fn, (mean,), (torch.ones_like(mean),))[1]
