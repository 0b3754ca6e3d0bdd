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

import torch
import torch.fx

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
# Ops that pass a tensor on unchanged in value (eval-mode dropout, casts, copies).
TRANSPARENT = (
    aten.dropout.default,
    aten.to.dtype,
    aten._to_copy.default,  # what a cast becomes under functionalization (passes/capture.py)
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
)
SQUARE = (aten.pow.Tensor_Scalar, aten.square.default)


def mean_only_nodes(graph: torch.fx.Graph, options: Mapping[str, str]) -> set[torch.fx.Node]:
    """Nodes whose value the rule options take at the mean (their covariance is dropped)."""
    held: set[torch.fx.Node] = set()
    if options.get("attention") == "paper":
        held.update(attention_probabilities(graph))
    if options.get("norm") == "paper":
        held.update(rms_statistics(graph))
    return held


def _consumers(node: torch.fx.Node) -> Iterator[tuple[torch.fx.Node, torch.fx.Node]]:
    """(user, operand) pairs: the ops that read ``node``'s value, looking through transparent ops."""
    for user in node.users:
        if user.op == "call_function" and user.target in TRANSPARENT:
            yield from _consumers(user)
        else:
            yield user, node


def attention_probabilities(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Softmax nodes whose output weights the values of an attention: softmax(...) @ V.

    The softmax is the left operand of a batched matmul whose right operand is an
    activation (a classifier's softmax never multiplies another tensor).
    """
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAX:
            continue
        if any(
            user.target in MATMUL and user.args[0] is operand and user.args[1].op != "placeholder"
            for user, operand in _consumers(node)
        ):
            found.append(node)
    return found


def rms_statistics(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The rsqrt(mean(x^2) + eps) nodes of a hand-written RMSNorm (as in Llama's LlamaRMSNorm)."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not aten.rsqrt.default:
            continue
        inner = node.args[0]
        if _is_call(inner, aten.add.Tensor, aten.add.Scalar) and not isinstance(inner.args[1], torch.fx.Node):
            inner = inner.args[0]
        if _is_call(inner, aten.mean.dim) and _is_call(inner.args[0], *SQUARE):
            square = inner.args[0]
            if square.target is aten.square.default or square.args[1] == 2:
                found.append(node)
    return found


def _is_call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets
