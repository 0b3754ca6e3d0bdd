"""Exact joins for the pair pass (option ``joins="exact"``): cross-covariances between live activations.

The pair pass calls :meth:`CrossCovariances.consume` before it handles each
node and :meth:`CrossCovariances.joined` after it has given the node its rule's
covariance. A node is *live* while some node not yet handled reads it; only
live activations can meet a new one again, so only their cross-covariances
with each new activation are built (see :mod:`fxstream.rules.cross`). Pruning
removes the ones no join reads.

The inputs of a multi-output op (split, chunk, layer norm) stay live until its
last ``getitem`` is handled, so that its outputs' cross-covariances with one
another (Q, K and V split from one projection) come out of the same rule.

A parameter read by more than one op (GPT-2's embedding, tied to its head) is a
fork too: it is live with its covariance formed dense, (N, N), and every
activation computed from it carries Cov(t, W) (B, N_t, N). That is exact, and
costs N per entry of t: affordable for small parameters only. A tie the pass
cannot carry (a posterior joint with a bias, a read through an op that
transforms the parameter first) is marked ``tie="dropped"`` on the parameter's
node, for the backend to warn.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping

import torch
import torch.fx

from ..rules import rule_for
from ..rules.cross import Pick, cross_covariance, joint_terms
from ..rules.registry import Path, arg_path
from ..rules.weights import dense_covariance, has_dense

#: The meta key of every node the pair pass makes: its role ("mean" or "cov"), whose covariance, which rule.
ROLE = "fxstream"


class CrossCovariances:
    """Cov(t, u) per pair of activations, as graph nodes of the paired graph under construction."""

    def __init__(self, graph: torch.fx.Graph, mean: dict, cov: dict, kind: dict, options: Mapping[str, str],
                 data_dependent: set) -> None:
        self.graph, self.mean, self.cov, self.kind, self.options = graph, mean, cov, kind, options
        self.data_dependent = data_dependent  # the pair pass's nodes computed from the inputs: they carry the batch
        self.cross: dict[tuple[torch.fx.Node, torch.fx.Node], torch.fx.Node] = {}
        self.remaining: dict[torch.fx.Node, int] = {}
        self.live: dict[torch.fx.Node, None] = {}  # insertion-ordered set
        self.tied: dict[torch.fx.Node, torch.fx.Node] = {}  # a parameter read twice -> its dense covariance

    def consume(self, node: torch.fx.Node) -> None:
        """``node`` is about to be handled: its inputs lose one pending reader (a multi-output op's
        inputs only when its last output has been picked)."""
        if node.target is operator.getitem and _is_multi_output(node.args[0]):
            source = node.args[0]
            self.remaining[source] = self.remaining.get(source, len(source.users)) - 1
            if self.remaining[source] == 0:
                self._release(source)
        elif not _is_multi_output(node):
            self._release(node)

    def _release(self, node: torch.fx.Node) -> None:
        for used in node.all_input_nodes:
            if used in self.live:
                self.remaining[used] -= 1
                if self.remaining[used] == 0:
                    del self.live[used]

    def covariance(self, a: torch.fx.Node, b: torch.fx.Node) -> torch.fx.Node | None:
        """The node holding Cov(a, b) (B, N_a, N_b), or None where a and b are uncorrelated."""
        if a is b:
            return self.tied.get(a, self.cov[a])
        if (a, b) in self.cross:
            return self.cross[a, b]
        if (b, a) in self.cross:
            transposed = self._tagged(a, self.graph.call_function(torch.ops.aten.transpose.int, (self.cross[b, a], 1, 2)), b)
            self.cross[a, b] = transposed
            return transposed
        return None

    def joined(self, node: torch.fx.Node, cov_node: torch.fx.Node, pick: Pick = None) -> torch.fx.Node:
        """The covariance of ``node`` with its correlated inputs' cross terms added; records its
        cross-covariances with every live activation and makes it live."""
        op_node = node.args[0] if pick is not None else node
        inputs = [(path, n) for path, n in _node_args(op_node, _unread(op_node, self.options))
                  if self.kind.get(n) == "full" or n in self.tied]
        batched = tuple(path for path, n in _node_args(op_node) if n in self.data_dependent)
        args = torch.fx.node.map_arg(op_node.args, lambda n: self.mean[n])
        kwargs = torch.fx.node.map_arg(dict(op_node.kwargs), lambda n: self.mean[n])
        out = self.mean[op_node]
        operand = lambda path, n: (path, batched if n in self.tied else None)  # noqa: E731
        pairs = [(operand(path_p, p), operand(path_q, q), cross)
                 for i, (path_p, p) in enumerate(inputs) for path_q, q in inputs[i + 1:]
                 if (cross := self.covariance(p, q)) is not None]
        if pairs:
            cov_node = self._tagged(node, self.graph.call_function(
                joint_terms, (op_node.target, args, kwargs, out, pick, cov_node, pairs)))
        self.cov[node] = cov_node
        for live in self.live:
            terms = [(operand(path, x), cross) for path, x in inputs
                     if (cross := self.covariance(x, live)) is not None]
            if terms:
                self.cross[node, live] = self._tagged(node, self.graph.call_function(
                    cross_covariance, (op_node.target, args, kwargs, out, pick, terms)), live)
        self.add_source(node)
        return cov_node

    def _tagged(self, of: torch.fx.Node, node: torch.fx.Node, other: torch.fx.Node | None = None) -> torch.fx.Node:
        """Tag a node of the pair pass: the covariance of ``of``, or its cross-covariance with ``other``."""
        node.meta[ROLE] = {"role": "cov", "of": of.name, "rule": "exact_join", "structure": "full"}
        if other is not None:
            node.meta[ROLE].update({"with": self.mean[other].name, "with_parameter": other in self.tied})
        return node

    def add_source(self, node: torch.fx.Node) -> None:
        """An activation with a covariance (an uncertain input, or a node just paired) becomes live, and so
        does a parameter read by more than one op, with its covariance formed dense."""
        kind = self.kind.get(node)
        if node.op == "placeholder" and isinstance(kind, str) and kind.startswith("param") and len(node.users) > 1:
            if not has_dense(kind):
                self.drop_tie(node, f"its '{kind}' posterior is joint with a bias")
                return
            dense = self.graph.call_function(dense_covariance, (kind, self.cov[node]))
            dense.meta[ROLE] = {"role": "cov", "of": node.name, "rule": "tied_parameter", "structure": TIED}
            self.tied[node] = dense
            self.mean[node].meta[ROLE]["tie"] = "carried"
        elif not (kind == "full" and not _is_multi_output(node)) or not node.users:
            return
        self.live[node] = None
        self.remaining[node] = len(node.users)

    def drop_tie(self, parameter: torch.fx.Node, reason: str) -> None:
        """Record that the correlation between a parameter's reads is not carried, and why."""
        self.mean[parameter].meta[ROLE].update(tie="dropped", reason=reason)


def _unread(node: torch.fx.Node, options: Mapping[str, str]) -> tuple[int, ...]:
    """The argument positions whose covariance the op's rule does not read (attention under the paper's
    rule reads only the values)."""
    rule = rule_for(node.target)
    return rule.unread(options) if rule is not None else ()


def _node_args(node: torch.fx.Node, unread: tuple[int, ...] = ()) -> Iterator[tuple[Path, torch.fx.Node]]:
    """(path, node) of every node among the op's arguments, skipping the positions in ``unread``."""
    def walk(prefix: Path, value) -> Iterator[tuple[Path, torch.fx.Node]]:
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(prefix + (("item", i),), item)
        elif isinstance(value, torch.fx.Node):
            yield prefix, value

    for index, value in enumerate(node.args):
        if index not in unread:
            yield from walk(arg_path(index), value)
    for key, value in node.kwargs.items():
        yield from walk((("kwargs", key),), value)


#: the cost model's structure of a tied parameter's dense covariance (N, N), N its number of entries
TIED = "tied_full"


def _is_multi_output(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (list, tuple))
