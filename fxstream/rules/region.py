"""Elementwise regions: tensors whose paths fork and rejoin through elementwise ops.

An activation written out by hand reads its input more than once:
GPT-2's new_gelu is 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))), a
hand-written SiLU is x * sigmoid(x), and PyTorch's GRU cell updates its state
as n + z * (h - n). The per-op rules treat the two operands of the rejoining
add or mul as independent, which is wrong for two functions of the same
tensor (at x ~ 1 new_gelu's variance came out 34% off, a GRU step twice the
exact one, and far off where the two paths cancel). For every such join, the
pair pass instead linearises the whole elementwise function from its inputs
(the region's leaves) to the join at once: var = sum_l g_l'(m)^2 v_l, or
sum_l J_l S_l J_l with J_l = diag(g_l'(m)) for full covariance, the leaves taken
as independent as everywhere else.

A join of several leaves is where a later region stops: its output is a leaf
of the regions after it, so a recurrence (a GRU's state, joined once a step)
gives one region a step rather than one that grows with every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.func import vjp

from .activation import ELEMENTWISE
from .linearise import elementwise_full

aten = torch.ops.aten

ARITHMETIC = (
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.neg.default, aten.reciprocal.default,
)
ELEMENTWISE_OPS = frozenset(ELEMENTWISE + ARITHMETIC)
#: Overloads taking a Python number as their second operand. PyTorch's forward-mode derivative of the
#: Tensor overload with a number reads the concrete sizes of its operand, which would fix every symbolic
#: size of a lowered graph; the Scalar overload does not.
_WITH_NUMBER = {
    aten.add.Tensor: aten.add.Scalar, aten.sub.Tensor: aten.sub.Scalar,
    aten.mul.Tensor: aten.mul.Scalar, aten.div.Tensor: aten.div.Scalar,
}


def number_overload(target, args: tuple):
    """``target``, or its Scalar overload where its second operand is a Python number."""
    if target in _WITH_NUMBER and len(args) > 1 and isinstance(args[1], (int, float)):
        return _WITH_NUMBER[target]
    return target


@dataclass
class Region:
    """The elementwise function from ``leaves`` (its inputs) to ``join``: its nodes in graph order, ``join`` last."""

    leaves: list[torch.fx.Node]
    nodes: list[torch.fx.Node]

    def function(self) -> torch.fx.GraphModule:
        """The region as a module of its leaves' values, in the order of ``leaves``."""
        graph = torch.fx.Graph()
        env = {leaf: graph.placeholder(f"leaf_{i}") for i, leaf in enumerate(self.leaves)}
        for node in self.nodes:
            copy = env[node] = graph.node_copy(node, lambda n: env[n])
            copy.target = number_overload(copy.target, copy.args)
        graph.output(env[self.nodes[-1]])
        return torch.fx.GraphModule(torch.nn.Module(), graph, class_name="ElementwiseRegion")


def shape_of(node: torch.fx.Node):
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def elementwise_joins(graph: torch.fx.Graph) -> dict[torch.fx.Node, Region]:
    """Every elementwise node that combines two paths from the same tensor, with its region.

    An elementwise op of tensor output is a region node; its leaves are those of its operands of the
    same shape that are region nodes, and its other operands (a join of several leaves counts as one
    such operand). It is a join when two of its operands share a leaf.
    """
    leaves_of: dict[torch.fx.Node, dict[torch.fx.Node, None]] = {}
    joins: dict[torch.fx.Node, Region] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ELEMENTWISE_OPS or shape_of(node) is None:
            continue
        operands = [leaves_of[a] if _inside(a, node, leaves_of, joins) else {a: None} for a in _operands(node)]
        leaves_of[node] = {leaf: None for leaves in operands for leaf in leaves}
        if any(not first.keys().isdisjoint(second) for i, first in enumerate(operands) for second in operands[i + 1:]):
            nodes = _ancestors_within(node, leaves_of, joins)
            leaves = [leaf for leaf in leaves_of[node] if any(leaf in n.all_input_nodes for n in nodes)]
            joins[node] = Region(leaves, nodes)
    return joins


def _inside(operand: torch.fx.Node, node: torch.fx.Node, leaves_of: dict, joins: dict) -> bool:
    """Whether ``operand`` extends ``node``'s region: a region node of its shape, not a join of several leaves."""
    if operand not in leaves_of or shape_of(operand) != shape_of(node):
        return False
    return operand not in joins or len(joins[operand].leaves) == 1


def _operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's operands that are nodes, repeats kept (x * x reads x twice)."""
    operands: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), operands.append)
    return operands


def _ancestors_within(join: torch.fx.Node, leaves_of: dict, joins: dict) -> list[torch.fx.Node]:
    """The region nodes that ``join`` depends on, in graph order."""
    seen, stack = set(), [join]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n in node.all_input_nodes if _inside(n, node, leaves_of, joins))
    return [n for n in join.graph.nodes if n in seen]


def region_covariance(args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options=None, batch=None):
    """Covariance of g(leaves) for the region g: sum over uncertain leaves of g_l'(m)^2 v_l (diag) or J_l S_l J_l.

    Called with the rule calling convention; ``args`` is (g, *leaves), ``covs`` (None, *their covariances).
    Each output element reads one element of each uncertain leaf (a leaf may lack the output's size-1 dims),
    so one vector-Jacobian product with ones gives every leaf's slopes at once.
    """
    region, *leaves = args
    means = [leaf.contiguous() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    uncertain = [i for i, cov in enumerate(covs[1:]) if cov is not None]

    def g(*values):
        full = list(means)
        for index, value in zip(uncertain, values):
            full[index] = value
        return region.forward(*full)

    result, pull = vjp(g, *(means[i] for i in uncertain))
    total = None
    for i, slope in zip(uncertain, pull(torch.ones_like(result))):
        cov = covs[1 + i]
        term = elementwise_full(cov, slope) if structure == "full" else (cov * slope.square()).reshape(out.shape)
        total = term if total is None else total + term
    return total


region_covariance.__name__ = region_covariance.__qualname__ = "cov_elementwise_region"
