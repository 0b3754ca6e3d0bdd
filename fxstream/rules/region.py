"""Elementwise regions: one uncertain tensor whose paths fork and rejoin.

An activation written out by hand reads its input more than once:
GPT-2's new_gelu is 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))), a
hand-written SiLU is x * sigmoid(x). The per-op rules treat the two operands
of the rejoining add or mul as independent, which is wrong for two functions
of the same x (at x ~ 1 new_gelu's variance came out 34% off, and far off
where g'(x) ~ 0 and the two paths cancel). For every such join, the pair pass
instead linearises the whole elementwise function from x to the join at once:
var = g'(m)^2 v, or J S J with J = diag(g'(m)) for full covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from .activation import ELEMENTWISE
from .linearise import derivative, elementwise_full

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
    """The elementwise function from ``source`` to ``join``: its nodes in graph order, ``join`` last."""

    source: torch.fx.Node
    nodes: list[torch.fx.Node]

    def function(self) -> torch.fx.GraphModule:
        """The region as a module of one argument, the source's value."""
        graph = torch.fx.Graph()
        env = {self.source: graph.placeholder("x")}
        for node in self.nodes:
            copy = env[node] = graph.node_copy(node, lambda n: env[n])
            copy.target = number_overload(copy.target, copy.args)
        graph.output(env[self.nodes[-1]])
        return torch.fx.GraphModule(torch.nn.Module(), graph, class_name="ElementwiseRegion")


def _shape(node: torch.fx.Node):
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def elementwise_joins(graph: torch.fx.Graph) -> dict[torch.fx.Node, Region]:
    """Every elementwise node that combines two paths from the same tensor, with its region.

    A node belongs to the region of ``source`` when it is an elementwise op of
    the source's shape whose tensor operands are the source or nodes of that
    region; it is a join when two of its operands are.
    """
    source_of: dict[torch.fx.Node, torch.fx.Node] = {}
    joins: dict[torch.fx.Node, Region] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ELEMENTWISE_OPS:
            continue
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        sources = {source_of.get(a, a) for a in node.all_input_nodes}
        if len(sources) != 1:
            continue
        source = sources.pop()
        if _shape(node) is None or _shape(node) != _shape(source):
            continue
        source_of[node] = source
        if len(operands) == 2:
            joins[node] = Region(source, _ancestors_within(node, source, source_of))
    return joins


def _ancestors_within(join: torch.fx.Node, source: torch.fx.Node, source_of: dict) -> list[torch.fx.Node]:
    """The region's nodes that ``join`` depends on, in graph order."""
    seen, stack = set(), [join]
    while stack:
        node = stack.pop()
        if node in seen or node is source:
            continue
        seen.add(node)
        stack.extend(n for n in node.all_input_nodes if source_of.get(n) is source or n is source)
    return [n for n in join.graph.nodes if n in seen]


def region_covariance(args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options=None, batch=None):
    """Covariance of g(x) for the region g and the uncertain x: g'(m)^2 v (diag) or J S J (full).

    Called with the rule calling convention; ``args`` is (g, x), ``covs`` (None, cov of x).
    """
    region, x = args
    slope = derivative(region.forward, x)
    cov = covs[1]
    if structure == "full":
        return elementwise_full(cov, slope)
    return cov * slope.square()


region_covariance.__name__ = region_covariance.__qualname__ = "cov_elementwise_region"
