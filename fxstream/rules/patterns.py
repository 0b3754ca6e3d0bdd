"""Subgraphs that the paper's rules evaluate at the means.

Some rules of the paper are not about one op but about a pattern of ops that a
model may write out by hand: eager attention (matmul, scale, mask, softmax,
matmul) keeps queries and keys deterministic, and a hand-written RMSNorm
(pow, mean, add eps, rsqrt, mul) holds its statistic constant. The pair pass
asks :func:`mean_only_nodes` which nodes of the captured graph to take at their
means under the chosen rule options; those nodes get no covariance, so the ops
after them see a deterministic operand. Fused ops (``scaled_dot_product_attention``,
``layer_norm``) read the same options in their own rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.fx

from .registry import same_shape

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
# Ops that pass a tensor on unchanged in value (eval-mode dropout, casts, copies).
TRANSPARENT = (
    aten.dropout.default,
    aten.to.dtype,
    aten._to_copy.default,  # what a cast is after functionalization (HF's softmax(..., float32).to(dtype))
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
)
SQUARE = (aten.pow.Tensor_Scalar, aten.square.default)
# Reshapes between an attention's softmax and its product with the values (BLOOM views the
# probabilities (B, H, T, S) as (B*H, T, S) for bmm); they keep the probabilities what they are.
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def mean_only_nodes(graph: torch.fx.Graph, options: Mapping[str, str]) -> set[torch.fx.Node]:
    """Nodes whose value the rule options take at the mean (their covariance is dropped)."""
    held: set[torch.fx.Node] = set()
    if options.get("attention") == "paper":
        held.update(attention_probabilities(graph))
    if options.get("norm") == "paper":
        held.update(rms_statistics(graph))
    return held


def _consumers(node: torch.fx.Node, through: tuple = TRANSPARENT) -> Iterator[tuple[torch.fx.Node, torch.fx.Node]]:
    """(user, operand) pairs: the ops that read ``node``'s value, looking through the ops in ``through``."""
    for user in node.users:
        if user.op == "call_function" and user.target in through:
            yield from _consumers(user, through)
        else:
            yield user, node


def attention_probabilities(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Softmax nodes whose output weights the values of an attention: softmax(...) @ V.

    The softmax is the left operand of a batched matmul whose right operand is an
    activation (a classifier's softmax never multiplies another tensor), possibly
    after casts, eval dropout and reshapes.
    """
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAX:
            continue
        if any(
            user.target in MATMUL and user.args[0] is operand and user.args[1].op != "placeholder"
            for user, operand in _consumers(node, TRANSPARENT + RESHAPES)
        ):
            found.append(node)
    return found


def rms_statistics(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The rsqrt(mean(x^2) + eps) nodes of a hand-written RMSNorm (as in Llama's LlamaRMSNorm)."""
    return [node for node in graph.nodes if _rms_statistic(node) is not None]


@dataclass(frozen=True)
class RmsJoin:
    """A hand-written RMSNorm's join ``x * rsqrt(mean(x^2, -1, keepdim) + eps)``: ``x`` is the mul's
    operand (the statistic's input, possibly through casts), ``eps`` the added constant."""

    x: torch.fx.Node
    eps: float


def rms_joins(graph: torch.fx.Graph) -> dict[torch.fx.Node, RmsJoin]:
    """The mul nodes where a hand-written RMSNorm rejoins x and its statistic over the last dimension.

    The statistic is a reduction of x, so rules/region.py does not see the join; the pair pass
    linearises it as one per-row function of x under norm="linearised" (rules/norm.py).
    """
    joins = {}
    for node in graph.nodes:
        parts = _rms_statistic(node)
        if parts is None:
            continue
        square_input, mean, eps = parts
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        value = square_input.meta.get("val")
        if not keepdim or not isinstance(value, torch.Tensor) or dims is None or len(dims) != 1 \
                or dims[0] not in (-1, value.dim() - 1):
            continue
        for user, operand in _consumers(node):
            if not _is_call(user, aten.mul.Tensor) or len(user.args) != 2 or user.kwargs:
                continue
            others = [a for a in user.args if a is not operand]
            if len(others) == 1 and isinstance(others[0], torch.fx.Node) \
                    and _through_transparent(others[0]) is _through_transparent(square_input) \
                    and _same_shape(others[0], square_input):
                joins[user] = RmsJoin(others[0], eps)
    return joins


def _rms_statistic(node) -> tuple[torch.fx.Node, torch.fx.Node, float] | None:
    """(x, the mean node, eps) when ``node`` is rsqrt(mean(x^2) + eps), else None."""
    if not _is_call(node, aten.rsqrt.default):
        return None
    inner, eps = node.args[0], 0.0
    if _is_call(inner, aten.add.Tensor, aten.add.Scalar) and not isinstance(inner.args[1], torch.fx.Node):
        inner, eps = inner.args[0], float(inner.args[1]) * float(inner.kwargs.get("alpha", 1))
    if _is_call(inner, aten.mean.dim) and _is_call(inner.args[0], *SQUARE):
        square = inner.args[0]
        if square.target is aten.square.default or square.args[1] == 2:
            return square.args[0], inner, eps
    return None


def _through_transparent(node: torch.fx.Node) -> torch.fx.Node:
    while _is_call(node, *TRANSPARENT) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and same_shape(va.shape, vb.shape)


def _is_call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets
