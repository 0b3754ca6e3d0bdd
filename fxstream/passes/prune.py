"""prune: drop covariance that no requested output needs.

Pairing creates covariance only downstream of an uncertainty source; this
pass walks a networkx view of the rewritten graph backwards from the requested
covariance outputs and erases every covariance node they do not reach. A
surviving marker for an op without a rule is the point where the user must
hear about it.

Covariance can also be partly dead: of a fused query/key/value projection
split three ways, the paper's attention rule reads only the values'
variances. Where every reader of an affine layer's covariance takes a slice of
its output features (through views that keep the last dim, then a split of
it), the layer's rule runs on those features alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx

from ..errors import UnsupportedOpError
from ..rules import RULES
from ..rules.linear import OUTPUT_FEATURES, narrowed_affine
from .pair import ROLE, PairedGraph

aten = torch.ops.aten
_KEEP_LAST_DIM = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
# Positions in a rule node's arguments (see pair): mean args, ..., covs, kinds, ..., mean out, structure.
_ARGS, _COVS, _KINDS, _OUT, _STRUCTURE = 0, 2, 4, 6, 7


@dataclass(frozen=True)
class PruneReport:
    """How many covariance nodes survived, how many were removed as dead, how many were narrowed."""

    kept: int
    pruned: int
    deterministic: int
    narrowed: int = 0


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """A DiGraph with an edge from every node to each of its users."""
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        dag.add_edges_from((node, user) for user in node.users)
    return dag


def prune(paired: PairedGraph) -> PruneReport:
    """Erase covariance nodes that no requested output reaches; raise for needed ones without a rule."""
    graph = paired.graph_module.graph
    output = next(iter(graph.find_nodes(op="output")))
    dag = to_networkx(graph)
    needed = nx.ancestors(dag, output)
    cov_nodes = [n for n in graph.nodes if n.meta.get(ROLE, {}).get("role") == "cov"]
    means = [n for n in graph.nodes if n.meta.get(ROLE, {}).get("role") == "mean"]
    covered = {n.meta[ROLE]["of"] for n in cov_nodes}
    for node in cov_nodes:
        info = node.meta[ROLE]
        if node in needed and info["rule"] == "unsupported":
            raise UnsupportedOpError(info["op"], info["module_path"], info["problem"])
    dead = [n for n in cov_nodes if n not in needed]
    graph.eliminate_dead_code()
    narrowed = sum(_narrow(split) for split in list(graph.nodes) if _rule_op(split) in _SPLITS)
    graph.lint()
    paired.graph_module.recompile()
    kept = len(cov_nodes) - len(dead)
    deterministic = sum(1 for n in means if n.op == "call_function" and n.name not in covered)
    report = PruneReport(kept=kept, pruned=len(dead), deterministic=deterministic, narrowed=narrowed)
    paired.counts = {"kept": report.kept, "pruned": report.pruned, "deterministic": report.deterministic,
                     "narrowed": report.narrowed}
    return report


def _rule_op(node: torch.fx.Node):
    """The op whose covariance a rule node computes (None for any other node)."""
    info = node.meta.get(ROLE, {})
    if info.get("role") != "cov" or node.op != "call_function" or len(node.args) <= _STRUCTURE:
        return None
    out = node.args[_OUT]
    return out.target if isinstance(out, torch.fx.Node) else None


def _features(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    return int(value.shape[-1]) if isinstance(value, torch.Tensor) and isinstance(value.shape[-1], int) else None


def _narrow(split: torch.fx.Node) -> bool:
    """Narrow the affine covariance feeding a split of the last dim to the pieces read; True if done."""
    mean_split = split.args[_OUT]
    pieces = mean_split.meta.get("val")
    dim = mean_split.args[2] if len(mean_split.args) > 2 else 0
    if not isinstance(pieces, (list, tuple)) or dim not in (-1, pieces[0].dim() - 1):
        return False
    sizes = [int(p.shape[-1]) if isinstance(p.shape[-1], int) else None for p in pieces]
    read = sorted(user.args[1] for user in split.users if user.target is operator.getitem)
    if None in sizes or len(read) != len(split.users) or not read or len(read) == len(sizes):
        return False
    start, stop = sum(sizes[: read[0]]), sum(sizes[: read[-1] + 1])
    node = split.args[_COVS][0]
    while _rule_op(node) in _KEEP_LAST_DIM and len(node.users) == 1 \
            and _features(node.args[_OUT]) == _features(node.args[_ARGS][0]):
        node = node.args[_COVS][0]
    op = _rule_op(node)
    if op not in OUTPUT_FEATURES or len(node.users) != 1 or node.args[_STRUCTURE] != "diag" \
            or node.target is not RULES[op].graph_target:
        return False
    weight, _, bias = OUTPUT_FEATURES[op]
    kinds = node.args[_KINDS]
    weight_mean = node.args[_ARGS][weight]
    bias_kind = kinds[bias] if bias is not None and bias < len(kinds) else None
    if kinds[weight] not in (None, "param_diag") or bias_kind not in (None, "param_diag") \
            or not isinstance(weight_mean, torch.fx.Node) or weight_mean.meta["val"].dim() != 2:
        return False
    graph = node.graph
    with graph.inserting_before(node):
        narrow = graph.call_function(narrowed_affine, (*node.args, op, slice(start, stop)))
    narrow.meta = dict(node.meta)
    node.replace_all_uses_with(narrow)
    graph.erase_node(node)
    return True
