"""prune: drop covariance that no requested output needs.

Pairing creates covariance only downstream of an uncertainty source; this
pass walks a networkx view of the rewritten graph backwards from the requested
covariance outputs and erases every covariance node they do not reach. A
surviving marker for an op without a rule is the point where the user must
hear about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx

from ..errors import UnsupportedOpError
from .pair import ROLE, PairedGraph


@dataclass(frozen=True)
class PruneReport:
    """How many covariance nodes survived, and how many were removed as dead."""

    kept: int
    pruned: int
    deterministic: int


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
    graph.lint()
    paired.graph_module.recompile()
    kept = len(cov_nodes) - len(dead)
    deterministic = sum(1 for n in means if n.op == "call_function" and n.name not in covered)
    report = PruneReport(kept=kept, pruned=len(dead), deterministic=deterministic)
    paired.counts = {"kept": report.kept, "pruned": report.pruned, "deterministic": report.deterministic}
    return report
