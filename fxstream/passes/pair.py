"""pair: give every node that an uncertainty source reaches a covariance node.

The captured graph is copied node by node (the copy computes the means, i.e.
the posterior-mean network, exactly). After each copied node whose inputs
carry covariance, a call to the op's rule computes the output covariance.
Ops with no rule get a marker node instead; pruning raises the error only if
that covariance is actually needed by a requested output, so an unsupported
op on a branch nobody asked about is harmless.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.node import map_aggregate

from ..errors import CaptureError, FxstreamError
from ..rules import DEFAULT_RULE_OPTIONS, RULES, mean_only_nodes
from ..rules.linearise import diag_to_full, full_to_diag
from ..rules.region import elementwise_joins, region_covariance
from ..rules.residual import residual_covariance, residual_joins
from ..rules.registry import ACTIVATION_STRUCTURES, RuleCall
from .capture import CapturedGraph, module_path

ROLE = "fxstream"
# A rule node's arguments are (args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options, batch):
# the positions later passes read them at.
RULE_ARGS, RULE_COVS, RULE_KINDS, RULE_KW_KINDS, RULE_OUT, RULE_STRUCTURE = 0, 2, 4, 5, 6, 7


@dataclass(frozen=True)
class Source:
    """An uncertainty source: a parameter or an input placeholder, with its covariance buffers."""

    kind: str
    tensors: tuple[torch.Tensor, ...]


@dataclass
class PairedGraph:
    """The rewritten graph: outputs are the original (flat) outputs, then one covariance each."""

    graph_module: torch.fx.GraphModule
    num_outputs: int
    cov_outputs: list[int]
    cov_kinds: list[str]
    structure: str
    counts: dict[str, int] = field(default_factory=dict)


def input_covariance(x: torch.Tensor, buffer: torch.Tensor, given: str, structure: str) -> torch.Tensor:
    """Covariance of an uncertain input in the graph's activation structure.

    ``buffer`` is a variance broadcastable to the input (given="diag") or a
    per-sample covariance (N, N) or (B, N, N) (given="full").
    """
    batch = x.shape[0]
    if given == "diag":
        var = buffer.expand_as(x)
        return var if structure == "diag" else diag_to_full(var, batch)
    n = x[0].numel()
    cov = buffer.reshape(-1, n, n).expand(batch, n, n)
    return full_to_diag(cov, x.shape) if structure == "diag" else cov


def unsupported(*args, **kwargs):
    """Stands in for a missing rule; pruning removes it or reports the op."""
    raise FxstreamError("a covariance node without a rule was executed; pruning should have rejected it")


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and torch.is_floating_point(value)


def _carries_float(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return any(_is_float_tensor(v) for v in value)
    return _is_float_tensor(value)


def pair(
    captured: CapturedGraph,
    sources: Mapping[str, Source],
    structure: str,
    requested: list[int] | None = None,
    rule_options: Mapping[str, str] | None = None,
) -> PairedGraph:
    """Copy the captured graph and pair each uncertain node with a covariance node.

    ``sources`` maps placeholder names to their uncertainty. ``requested``
    lists the flat output positions whose covariance the caller wants (default:
    every floating-point output that carries uncertainty). ``rule_options``
    (see ``RULE_OPTIONS``) reach every rule; under them some nodes are taken
    at their means (e.g. attention probabilities in the paper's rule) and get
    no covariance.
    """
    options = {**DEFAULT_RULE_OPTIONS, **(rule_options or {})}
    old = captured.graph_module.graph
    held_at_mean = mean_only_nodes(old, options)
    joins = elementwise_joins(old)
    residuals = residual_joins(old, held_at_mean, options["norm"]) if options["residual"] == "linearised" else {}
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    mean: dict[torch.fx.Node, torch.fx.Node] = {}
    cov: dict[torch.fx.Node, object] = {}
    kind: dict[torch.fx.Node, object] = {}
    data_dependent: set[torch.fx.Node] = set()
    input_names = {p.name for p in captured.inputs()}
    first_input: torch.fx.Node | None = None
    batch: torch.fx.Node | None = None  # the input's leading size, made once for full-structure rules

    def batch_for(out_structure: str) -> torch.fx.Node | None:
        """The input's leading size, which full-structure rules take (made once, where first needed)."""
        nonlocal batch
        if out_structure != "full":
            return None
        if batch is None and first_input is not None:
            batch = graph.call_function(torch.ops.aten.sym_size.int, (first_input, 0))
        return batch

    def looked_up(table: dict) -> Callable:
        """arg -> what ``table`` holds for it (None for non-nodes and nodes it lacks)."""
        return lambda arg: table.get(arg) if isinstance(arg, torch.fx.Node) else None

    def buffer(tensor: torch.Tensor) -> torch.fx.Node:
        name = f"fxstream_cov_{len(root._buffers)}"
        root.register_buffer(name, tensor)
        return graph.get_attr(name)

    output_node = None
    for node in old.nodes:
        if node.op == "output":
            output_node = node
            break
        new = graph.node_copy(node, lambda n: mean[n])
        mean[node] = new
        if node.op == "get_attr":
            _copy_attribute(captured.graph_module, root, node.target)
        new.meta[ROLE] = {"role": "mean"}
        if node.op == "placeholder":
            if node.name in input_names:
                data_dependent.add(node)
                first_input = first_input or new
            source = sources.get(node.name)
            if source is not None:
                if node.name in input_names:
                    cov_node = graph.call_function(
                        input_covariance, (new, buffer(source.tensors[0]), source.kind, structure)
                    )
                    kind[node] = structure
                else:
                    tensors = tuple(buffer(t) for t in source.tensors)
                    cov_node = tensors[0] if len(tensors) == 1 else tensors
                    kind[node] = source.kind
                _tag(cov_node, node, "source")
                cov[node] = cov_node
            continue
        if any(n in data_dependent for n in node.all_input_nodes):
            data_dependent.add(node)
        uncertain = [n for n in node.all_input_nodes if n in cov]
        if not uncertain or not _carries_float(node) or node in held_at_mean:
            continue
        if node.target is operator.getitem:
            source_node, index = node.args
            cov[node] = graph.call_function(operator.getitem, (cov[source_node], index))
            kind[node] = _item(kind[source_node], index)
            _tag(cov[node], node, "getitem")
            continue
        out_structure = structure if node in data_dependent else _param_kind(uncertain, kind)
        region = joins.get(node)
        if region is not None and kind.get(region.source) in ACTIVATION_STRUCTURES:
            name = f"fxstream_region_{node.name}"
            root.add_module(name, region.function())
            function = graph.get_attr(name)
            _tag(function, node, "elementwise_region")
            cov[node] = graph.call_function(
                region_covariance,
                ((function, mean[region.source]), {}, (None, cov[region.source]), {}, (None, kind[region.source]),
                 {}, new, out_structure, options, batch_for(out_structure)),
            )
            _tag(cov[node], node, "elementwise_region")
            kind[node] = out_structure
            continue
        rule = RULES.get(node.target)
        unread = rule.unread(options) if rule is not None else ()
        covs = tuple(None if i in unread else map_aggregate(a, looked_up(cov)) for i, a in enumerate(node.args))
        kw_covs = map_aggregate(dict(node.kwargs), looked_up(cov))
        kinds = map_aggregate(node.args, looked_up(kind))
        kw_kinds = map_aggregate(dict(node.kwargs), looked_up(kind))
        args = map_aggregate(node.args, lambda a: mean[a] if isinstance(a, torch.fx.Node) else a)
        kwargs = map_aggregate(dict(node.kwargs), lambda a: mean[a] if isinstance(a, torch.fx.Node) else a)
        problem = _rule_problem(rule, out_structure, uncertain, kind)
        if problem is None and rule.supports is not None:
            example = lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a  # noqa: E731
            problem = rule.supports(RuleCall(
                node.target, map_aggregate(node.args, example), map_aggregate(dict(node.kwargs), example),
                tuple(None if i in unread else k for i, k in enumerate(kinds)), kw_kinds, kinds, kw_kinds,
                node.meta.get("val"), out_structure, options))
        if problem is None:
            cov_node = graph.call_function(
                rule.graph_target,
                (args, kwargs, covs, kw_covs, kinds, kw_kinds, new, out_structure, options, batch_for(out_structure)),
            )
            _tag(cov_node, node, rule.name)
            residual = residuals.get(node)
            if residual is not None and kind.get(residual.fork) == "diag" and out_structure == "diag":
                name = f"fxstream_residual_{node.name}"
                root.add_module(name, residual.branch)
                branch = graph.get_attr(name)
                _tag(branch, node, "residual_join")
                cov_node = graph.call_function(
                    residual_covariance,
                    (branch, tuple(mean[n] for n in residual.inputs), cov[residual.fork], cov_node, residual.sign),
                )
                _tag(cov_node, node, "residual_join")
        else:
            cov_node = graph.call_function(unsupported, (new,))
            _tag(cov_node, node, "unsupported")
            cov_node.meta[ROLE]["problem"] = problem
            cov_node.meta[ROLE]["module_path"] = module_path(node)
            cov_node.meta[ROLE]["op"] = str(node.target)
        cov[node] = cov_node
        kind[node] = out_structure

    if output_node is None:
        raise CaptureError("captured graph has no output")
    flat_outputs = list(torch.utils._pytree.tree_leaves(output_node.args[0]))
    if requested is None:
        requested = [i for i, n in enumerate(flat_outputs) if isinstance(n, torch.fx.Node) and n in cov]
    cov_outputs, cov_kinds = [], []
    for index in requested:
        node = flat_outputs[index]
        if not isinstance(node, torch.fx.Node) or node not in cov:
            continue
        cov_outputs.append(index)
        cov_kinds.append(kind[node])
    means_out = [mean[n] if isinstance(n, torch.fx.Node) else n for n in flat_outputs]
    graph.output(tuple(means_out) + tuple(cov[flat_outputs[i]] for i in cov_outputs))
    gm = torch.fx.GraphModule(root, graph, class_name="StreamlinedGraph")
    return PairedGraph(gm, len(flat_outputs), cov_outputs, cov_kinds, structure)


def _copy_attribute(source: torch.nn.Module, target: torch.nn.Module, qualified: str) -> None:
    """Give ``target`` the constant tensor (or submodule) a get_attr node of ``source`` reads."""
    *path, name = qualified.split(".")
    for part in path:
        if not hasattr(target, part):
            target.add_module(part, torch.nn.Module())
        source, target = getattr(source, part), getattr(target, part)
    value = getattr(source, name)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        target.register_buffer(name, value)
    else:
        setattr(target, name, value)


def _tag(cov_node, of: torch.fx.Node, rule: str) -> None:
    for node in cov_node if isinstance(cov_node, tuple) else (cov_node,):
        node.meta[ROLE] = {"role": "cov", "of": of.name, "rule": rule}


def _item(kinds, index):
    return kinds[index] if isinstance(kinds, (list, tuple)) else kinds


def _param_kind(uncertain: list[torch.fx.Node], kind: dict) -> str:
    kinds = {kind[n] for n in uncertain}
    return kinds.pop() if len(kinds) == 1 else "mixed:" + ",".join(sorted(map(str, kinds)))


def _rule_problem(rule, out_structure: str, uncertain, kind) -> str | None:
    """Why ``rule`` cannot produce ``out_structure`` here, or None when it can."""
    if rule is None:
        return ""
    for n in uncertain:
        k = kind[n]
        if isinstance(k, str) and k.startswith("param") and k not in rule.param_kinds:
            return f"the rule does not accept a '{k}' parameter posterior"
    if out_structure.startswith("param"):
        if not rule.param_passthrough:
            return "it transforms an uncertain parameter before the parameter meets data"
        return None
    if out_structure not in rule.structures:
        return f"the rule has no '{out_structure}' activation structure"
    return None
