"""prune: drop covariance that no requested output needs.

Pairing creates covariance only downstream of an uncertainty source; this
pass walks a networkx view of the rewritten graph backwards from the requested
covariance outputs and erases every covariance node they do not reach. A
surviving marker for an op without a rule is the point where the user must
hear about it.

Covariance can also be partly dead: of a fused query/key/value projection
split three ways, the paper's attention rule reads only the values'
variances. Where every reader of an affine layer's covariance takes a slice of
its output features (through views that keep the last dim, then splits or
slices of it), the layer's rule runs on those features alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from ..errors import UnsupportedOpError
from ..rules import RULES
from ..rules.linear import OUTPUT_FEATURES, narrowed_affine
from .pair import RULE_ARGS, RULE_COVS, RULE_KINDS, RULE_OUT, RULE_STRUCTURE, ROLE, PairedGraph

aten = torch.ops.aten
_KEEP_LAST_DIM = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


@dataclass(frozen=True)
class PruneReport:
    """How many covariance nodes survived, how many were removed as dead, how many were narrowed."""

    kept: int
    pruned: int
    deterministic: int
    narrowed: int = 0
    pruned_rules: dict[str, str] = field(default_factory=dict)  # mean node -> rule of its pruned covariance


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
    unsupported = [node.meta[ROLE] for node in cov_nodes if node in needed and node.meta[ROLE]["rule"] == "unsupported"]
    if unsupported:
        raise UnsupportedOpError([(info["op"], info["module_path"], info["problem"]) for info in unsupported])
    dead = [n for n in cov_nodes if n not in needed]
    graph.eliminate_dead_code()
    narrowed = sum(_narrow(node) for node in list(graph.nodes) if _rule_op(node) in OUTPUT_FEATURES)
    graph.lint()
    paired.graph_module.recompile()
    kept = len(cov_nodes) - len(dead)
    deterministic = sum(1 for n in means if n.op == "call_function" and n.name not in covered)
    report = PruneReport(kept=kept, pruned=len(dead), deterministic=deterministic, narrowed=narrowed,
                         pruned_rules={n.meta[ROLE]["of"]: n.meta[ROLE]["rule"] for n in dead})
    paired.counts = {"kept": report.kept, "pruned": report.pruned, "deterministic": report.deterministic,
                     "narrowed": report.narrowed}
    return report


def _rule_op(node: torch.fx.Node):
    """The op whose covariance a rule node computes (None for any other node)."""
    info = node.meta.get(ROLE, {})
    if info.get("role") != "cov" or node.op != "call_function" or len(node.args) <= RULE_STRUCTURE:
        return None
    out = node.args[RULE_OUT]
    return out.target if isinstance(out, torch.fx.Node) else None


def _features(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    return int(value.shape[-1]) if isinstance(value, torch.Tensor) and isinstance(value.shape[-1], int) else None


def _is_last_dim(dim, ndim: int) -> bool:
    return dim in (-1, ndim - 1)


def _columns_read(reader: torch.fx.Node, node: torch.fx.Node, width: int) -> tuple[int, int] | None:
    """The output features [start, stop) that ``reader`` takes from ``node``'s covariance; None: unknown."""
    op = _rule_op(reader)
    if (op not in _SPLITS and op is not aten.slice.Tensor) or reader.args[RULE_COVS][0] is not node:
        return None
    mean = reader.args[RULE_OUT]
    args, value = mean.args, mean.meta.get("val")
    if op is aten.slice.Tensor:
        defaults = (None, 0, None, None, 1)  # input, dim, start, end, step
        dim, start, stop, step = (args[i] if i < len(args) else defaults[i] for i in range(1, 5))
        if not isinstance(value, torch.Tensor) or not _is_last_dim(dim, value.dim()) or step != 1:
            return None
        start, stop = (0 if start is None else start), (width if stop is None else stop)
        if not (isinstance(start, int) and isinstance(stop, int)):
            return None
        start, stop = (v + width if v < 0 else v for v in (start, stop))
        return max(0, start), min(width, stop)
    if not isinstance(value, (list, tuple)) or not value:
        return None
    sizes = [piece.shape[-1] for piece in value]
    read = sorted(user.args[1] for user in reader.users if user.target is operator.getitem)
    dim = args[2] if len(args) > 2 else 0
    if not _is_last_dim(dim, value[0].dim()) or not all(isinstance(n, int) for n in sizes) \
            or len(read) != len(reader.users) or not read:
        return None
    return sum(sizes[: read[0]]), sum(sizes[: read[-1] + 1])


def _narrow(affine: torch.fx.Node) -> bool:
    """Narrow an affine layer's covariance to the output features its readers take; True if done.

    Its readers are found through views that keep the last dim, each a split or
    slice of the last dim; the columns computed are the span of what they take.
    """
    op = _rule_op(affine)
    if affine.target is not RULES[op].graph_target or affine.args[RULE_STRUCTURE] != "diag":
        return False
    weight, _, bias = OUTPUT_FEATURES[op]
    kinds = affine.args[RULE_KINDS]
    weight_mean = affine.args[RULE_ARGS][weight]
    bias_kind = kinds[bias] if bias is not None and bias < len(kinds) else None
    width = _features(affine.args[RULE_OUT])
    if width is None or kinds[weight] not in (None, "param_diag") or bias_kind not in (None, "param_diag") \
            or not isinstance(weight_mean, torch.fx.Node) or weight_mean.meta["val"].dim() != 2:
        return False
    node = affine
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _rule_op(user) not in _KEEP_LAST_DIM or _features(user.args[RULE_OUT]) != width:
            break
        node = user
    spans = [_columns_read(reader, node, width) for reader in node.users]
    if not spans or None in spans:
        return False
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if (start, stop) == (0, width):
        return False
    graph = affine.graph
    with graph.inserting_before(affine):
        narrow = graph.call_function(narrowed_affine, (*affine.args, op, slice(start, stop)))
    narrow.meta = dict(affine.meta)
    affine.replace_all_uses_with(narrow)
    graph.erase_node(affine)
    return True
