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
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.node import map_aggregate

from ..errors import CaptureError, FxstreamError
from ..rules import DEFAULT_RULE_OPTIONS, VALUE_INDEPENDENT, mean_only_nodes, rule_for
from ..rules.linear import OPERANDS, variance_only_chains
from ..rules.linearise import diag_to_full, full_to_diag
from ..rules.norm import rms_norm_covariance
from ..rules.patterns import rms_joins
from ..rules.region import elementwise_joins, region_covariance, shape_of
from ..rules.gates import product_covariance, product_joins
from ..rules.residual import residual_covariance, residual_joins
from ..rules.registry import ACTIVATION_STRUCTURES, RuleCall
from .capture import CapturedGraph, module_path
from .decompose import DECOMPOSED_FROM
from .joins import ROLE, CrossCovariances

aten = torch.ops.aten
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
    return Pairing(captured, sources, structure, rule_options).run(requested)


class Pairing:
    """The pair pass as one handler per kind of node, in the manner of ``torch.fx.Interpreter``.

    :meth:`run` walks the captured graph once; every node is copied as its mean
    (:meth:`copy_mean`), then handled by the method for its op (``placeholder``,
    ``get_attr``, ``call_function``), which gives it a covariance node where an
    uncertainty source reaches it: a source buffer, a ``getitem`` of a
    multi-output covariance, the joint linearisation of an elementwise region or of a
    hand-written RMSNorm (norm="linearised"),
    its op's rule (plus a residual join's cross term), or an ``unsupported``
    marker for pruning to report.
    """

    def __init__(self, captured: CapturedGraph, sources: Mapping[str, Source], structure: str,
                 rule_options: Mapping[str, str] | None = None) -> None:
        self.captured, self.sources, self.structure = captured, sources, structure
        self.options = {**DEFAULT_RULE_OPTIONS, **(rule_options or {})}
        old = captured.graph_module.graph
        self.held_at_mean = mean_only_nodes(old, self.options)
        self.joins = elementwise_joins(old)
        self.rms = rms_joins(old) if self.options["norm"] == "linearised" else {}
        self.residuals = residual_joins(old, self.held_at_mean, self.options["norm"], self.options["attention"]) \
            if self.options["residual"] == "linearised" else {}
        self.gates = product_joins(old, self.held_at_mean, self.options["norm"]) \
            if self.options["gates"] == "linearised" and structure == "diag" else {}
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.mean: dict[torch.fx.Node, torch.fx.Node] = {}
        self.cov: dict[torch.fx.Node, object] = {}
        self.kind: dict[torch.fx.Node, object] = {}
        self.data_dependent: set[torch.fx.Node] = set()
        self.input_names = {p.name for p in captured.inputs()}
        self.crosses = CrossCovariances(self.graph, self.mean, self.cov, self.kind, self.options, self.data_dependent) \
            if self.options["joins"] == "exact" and structure == "full" else None
        if self.crosses is not None:  # the cross-covariances make every join exact; no pattern needed
            self.joins, self.rms, self.residuals, self.gates = {}, {}, {}, {}
        self.first_input: torch.fx.Node | None = None
        self.batch: torch.fx.Node | None = None  # the input's leading size, made once for full-structure rules
        #: output_cov="diag": the last linear layer before each output with the nodes up to it, and the
        #: nodes of such chains whose layer has a weight (not an activation): they carry variances only
        self.layer_chains: dict[torch.fx.Node, set[torch.fx.Node]] = {}
        self.variance_only: set[torch.fx.Node] = set()

    def run(self, requested: list[int] | None) -> PairedGraph:
        if self.options["output_cov"] == "diag" and self.structure == "full":
            flat = torch.utils._pytree.tree_leaves(next(iter(self.captured.graph_module.graph.find_nodes(
                op="output"))).args[0])
            chosen = range(len(flat)) if requested is None else requested
            self.layer_chains = variance_only_chains([flat[i] for i in chosen if i < len(flat)])
        output_node = None
        for node in self.captured.graph_module.graph.nodes:
            if node.op == "output":
                output_node = node
                break
            self.copy_mean(node)
            if self.crosses is not None:
                self.crosses.consume(node)
            getattr(self, node.op)(node)
        if output_node is None:
            raise CaptureError("captured graph has no output")
        return self.output(output_node, requested)

    def copy_mean(self, node: torch.fx.Node) -> None:
        new = self.graph.node_copy(node, lambda n: self.mean[n])
        new.meta[ROLE] = {"role": "mean"}
        self.mean[node] = new
        if any(n in self.data_dependent for n in node.all_input_nodes):
            self.data_dependent.add(node)

    def placeholder(self, node: torch.fx.Node) -> None:
        new = self.mean[node]
        if node.name in self.input_names:
            self.data_dependent.add(node)
            self.first_input = self.first_input or new
        source = self.sources.get(node.name)
        if source is None:
            return
        if node.name in self.input_names:
            cov_node = self.graph.call_function(
                input_covariance, (new, self.buffer(source.tensors[0]), source.kind, self.structure))
            self.kind[node] = self.structure
        else:
            tensors = tuple(self.buffer(t) for t in source.tensors)
            cov_node = tensors[0] if len(tensors) == 1 else tensors
            self.kind[node] = source.kind
        _tag(cov_node, node, "source")
        self.cov[node] = cov_node
        if self.crosses is not None:
            self.crosses.add_source(node)

    def get_attr(self, node: torch.fx.Node) -> None:
        _copy_attribute(self.captured.graph_module, self.root, node.target)

    def call_function(self, node: torch.fx.Node) -> None:
        uncertain = [n for n in node.all_input_nodes if n in self.cov]
        if not uncertain or not _carries_float(node) or node in self.held_at_mean \
                or node.target in VALUE_INDEPENDENT:
            return
        if node.target is operator.getitem:
            self.getitem(node)
            return
        if self.per_sample_lookup(node):
            self.data_dependent.add(node)
        out_structure = self.structure if node in self.data_dependent else _param_kind(uncertain, self.kind)
        if self.crosses is not None and out_structure.startswith("param"):
            for parameter in self.crosses.tied.keys() & set(uncertain):
                self.crosses.drop_tie(parameter, f"{module_path(node)} applies {node.target} to it before it "
                                                 "meets data")
        if node in self.layer_chains and self.variances_suffice(node):
            self.variance_only |= self.layer_chains[node]
        if node in self.variance_only:
            out_structure = "diag"
        region, rms = self.joins.get(node), self.rms.get(node)
        if rms is not None and self.kind.get(rms.x) in ACTIVATION_STRUCTURES and out_structure == self.kind[rms.x]:
            self.cov[node] = self.rms_join(node, rms, out_structure)
        elif region is not None and self.takes_region(node, region, out_structure):
            self.cov[node] = self.region(node, region, out_structure)
        else:
            self.cov[node] = self.rule(node, uncertain, out_structure)
        self.kind[node] = out_structure
        if self.crosses is not None and out_structure == "full" and not isinstance(node.meta.get("val"), (list, tuple)):
            self.cov[node] = self.crosses.joined(node, self.cov[node])

    def per_sample_lookup(self, node: torch.fx.Node) -> bool:
        """A full-mode lookup of a table by indices of the batch's leading size (BERT's token types, all 0):
        the positions of one sample may read one row, so its output is an activation, whose rule keeps their
        correlation (a parameter's entries count as independent). Position ids (1, T) read distinct rows."""
        if self.structure != "full" or node.target is not torch.ops.aten.embedding.default or self.first_input is None:
            return False
        indices, example = node.args[1].meta.get("val"), self.first_input.meta.get("val")
        return isinstance(indices, torch.Tensor) and isinstance(example, torch.Tensor) and indices.dim() > 0 \
            and example.dim() > 0 and statically_known_true(indices.shape[0] == example.shape[0])

    def variances_suffice(self, layer: torch.fx.Node) -> bool:
        """Whether a layer's output variances need no more of its input's full covariance than each row's
        block: under exact joins no uncertain activation added and no weight read elsewhere too (their cross
        terms with x come from joined()), a weight that is no activation, and whose posterior meets E[x x^T]
        through its diagonal only (a diagonal one) or not at all (products="linearised")."""
        _, weight_at, added_at = OPERANDS[layer.target]
        added = layer.args[added_at] if added_at is not None and added_at < len(layer.args) else None
        if self.crosses is not None and (self.kind.get(added) in ACTIVATION_STRUCTURES
                                         or layer.args[weight_at] in self.crosses.tied):
            return False
        weight = self.kind.get(layer.args[weight_at])
        return weight is None or weight == "param_diag" or (
            self.options["products"] == "linearised" and weight not in ACTIVATION_STRUCTURES)

    def call_module(self, node: torch.fx.Node) -> None:
        raise CaptureError(f"captured graph calls module '{node.target}'; capture should have inlined it")

    call_method = call_module

    def getitem(self, node: torch.fx.Node) -> None:
        """One output of a multi-output op: the same item of its covariances."""
        source_node, index = node.args
        self.cov[node] = self.graph.call_function(operator.getitem, (self.cov[source_node], index))
        self.kind[node] = _item(self.kind[source_node], index)
        _tag(self.cov[node], node, "getitem")
        if self.crosses is not None and self.kind[node] == "full":
            self.cov[node] = self.crosses.joined(node, self.cov[node], pick=index)

    def takes_region(self, node: torch.fx.Node, region, out_structure: str) -> bool:
        """Whether the join's region is linearised whole: each uncertain leaf holds one element per element of
        the join (size-1 dims aside), in the join's structure, or as a parameter's independent entries with
        diagonal activations. A leaf broadcast to several elements (a per-channel parameter) is left to the
        per-op rules."""
        uncertain = [leaf for leaf in region.leaves if leaf in self.cov]
        allowed = {out_structure, "param_diag"} if out_structure == "diag" else {out_structure}
        return bool(uncertain) and all(self.kind.get(leaf) in allowed and _unit_dims_aside(shape_of(leaf)) ==
                                       _unit_dims_aside(shape_of(node)) for leaf in uncertain)

    def region(self, node: torch.fx.Node, region, out_structure: str) -> torch.fx.Node:
        """An elementwise region whose paths rejoin: linearised as one function of its leaves."""
        name = f"fxstream_region_{node.name}"
        self.root.add_module(name, region.function())
        function = self.graph.get_attr(name)
        _tag(function, node, "elementwise_region")
        cov_node = self.graph.call_function(
            region_covariance,
            ((function, *(self.mean[leaf] for leaf in region.leaves)), {},
             (None, *(self.cov.get(leaf) for leaf in region.leaves)), {},
             (None, *(self.kind.get(leaf) for leaf in region.leaves)), {}, self.mean[node], out_structure,
             self.options, self.batch_for(out_structure)),
        )
        _tag(cov_node, node, "elementwise_region")
        return cov_node

    def rms_join(self, node: torch.fx.Node, rms, out_structure: str) -> torch.fx.Node:
        """A hand-written RMSNorm's x * rsqrt(mean(x^2) + eps): linearised as one per-row function of x."""
        cov_node = self.graph.call_function(
            rms_norm_covariance,
            ((self.mean[rms.x], rms.eps), {}, (self.cov[rms.x], None), {}, (self.kind[rms.x], None), {},
             self.mean[node], out_structure, self.options, self.batch_for(out_structure)),
        )
        _tag(cov_node, node, "rms_norm_linearised")
        return cov_node

    def rule(self, node: torch.fx.Node, uncertain: list[torch.fx.Node], out_structure: str) -> torch.fx.Node:
        """The op's rule, called on the means and the covariances it reads; a marker where it has none."""
        rule = rule_for(node.target)
        unread = rule.unread(self.options) if rule is not None else ()
        covs = tuple(None if i in unread else map_aggregate(a, self.looked_up(self.cov))
                     for i, a in enumerate(node.args))
        kw_covs = map_aggregate(dict(node.kwargs), self.looked_up(self.cov))
        kinds = map_aggregate(node.args, self.looked_up(self.kind))
        kw_kinds = map_aggregate(dict(node.kwargs), self.looked_up(self.kind))
        marginal = _marginal_structure(rule, out_structure)
        structure = marginal or out_structure
        problem = _rule_problem(rule, structure, uncertain, self.kind, node.target)
        if problem is None and rule.supports is not None:
            example = lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a  # noqa: E731
            problem = rule.supports(RuleCall(
                node.target, map_aggregate(node.args, example), map_aggregate(dict(node.kwargs), example),
                tuple(None if i in unread else k for i, k in enumerate(kinds)), kw_kinds, kinds, kw_kinds,
                node.meta.get("val"), structure, self.options))
        if problem is not None:
            return self.unsupported(node, problem)
        new = self.mean[node]
        args = map_aggregate(node.args, self.looked_up(self.mean, keep=True))
        kwargs = map_aggregate(dict(node.kwargs), self.looked_up(self.mean, keep=True))
        cov_node = self.graph.call_function(
            rule.graph_target,
            (args, kwargs, covs, kw_covs, kinds, kw_kinds, new, structure, self.options,
             self.batch_for(structure)),
        )
        _tag(cov_node, node, rule.name)
        if marginal:
            cov_node.meta[ROLE]["marginal"] = module_path(node)
        residual = self.residuals.get(node)
        if residual is not None and self.kind.get(residual.fork) == "diag" and out_structure == "diag":
            cov_node = self.residual_join(node, residual, cov_node)
        gate = self.gates.get(node)
        if gate is not None and out_structure == "diag" and self.kind.get(gate.fork) == "diag" \
                and all(self.kind.get(factor) == "diag" for factor in node.args[:2]):
            cov_node = self.gated_product(node, gate, cov_node)
        return cov_node

    def gated_product(self, node: torch.fx.Node, gate, cov_node: torch.fx.Node) -> torch.fx.Node:
        """A product of two factors from one tensor: the independent product plus their covariance terms."""
        return self.join_term(node, "gated_product", gate.gate, product_covariance, gate.inputs, gate.fork, cov_node,
                              self.options["products"] == "moments")

    def residual_join(self, node: torch.fx.Node, residual, cov_node: torch.fx.Node) -> torch.fx.Node:
        """A residual add: the independent sum plus the skip/branch cross term."""
        return self.join_term(node, "residual_join", residual.branch, residual_covariance, residual.inputs,
                              residual.fork, cov_node, residual.sign)

    def join_term(self, node: torch.fx.Node, rule: str, module: torch.nn.Module, function: Callable,
                  inputs: list[torch.fx.Node], fork: torch.fx.Node, cov_node: torch.fx.Node, *extra) -> torch.fx.Node:
        """``function(module, the means of inputs, the fork's covariance, cov_node, *extra)``: a join's
        covariance, ``module`` (how to evaluate the cross term) kept on the rewritten graph."""
        name = f"fxstream_{rule}_{node.name}"
        self.root.add_module(name, module)
        attribute = self.graph.get_attr(name)
        _tag(attribute, node, rule)
        joined = self.graph.call_function(
            function, (attribute, tuple(self.mean[n] for n in inputs), self.cov[fork], cov_node, *extra))
        _tag(joined, node, rule)
        return joined

    def unsupported(self, node: torch.fx.Node, problem: str) -> torch.fx.Node:
        """A marker for pruning: raised as UnsupportedOpError only if a requested output needs it."""
        cov_node = self.graph.call_function(unsupported, (self.mean[node],))
        _tag(cov_node, node, "unsupported")
        origin = node.meta.get(DECOMPOSED_FROM)
        cov_node.meta[ROLE].update(
            problem=problem, module_path=module_path(node),
            op=str(node.target) + (f" (from the decomposition of {origin})" if origin else ""))
        return cov_node

    def output(self, output_node: torch.fx.Node, requested: list[int] | None) -> PairedGraph:
        """The original outputs' means, then the covariance of each requested one that has any."""
        flat_outputs = list(torch.utils._pytree.tree_leaves(output_node.args[0]))
        if requested is None:
            requested = [i for i, n in enumerate(flat_outputs) if isinstance(n, torch.fx.Node) and n in self.cov]
        cov_outputs, cov_kinds = [], []
        for index in requested:
            node = flat_outputs[index]
            if not isinstance(node, torch.fx.Node) or node not in self.cov:
                continue
            if self.options["output_cov"] == "diag" and self.kind[node] == "full":  # not from a linear layer
                self.cov[node] = self.graph.call_function(output_variances, (self.cov[node], self.mean[node]))
                _tag(self.cov[node], node, "output_variances")
                self.kind[node] = "diag"
            cov_outputs.append(index)
            cov_kinds.append(self.kind[node])
        means_out = [self.mean[n] if isinstance(n, torch.fx.Node) else n for n in flat_outputs]
        self.graph.output(tuple(means_out) + tuple(self.cov[flat_outputs[i]] for i in cov_outputs))
        # Lazy: Python code is generated on the first call, not on every recompile. Prune edits the graph
        # and the planner costs many rewrites it never runs; generating their code took a third of its time.
        gm = _LazyGraphModule(self.root, self.graph, class_name="StreamlinedGraph")
        return PairedGraph(gm, len(flat_outputs), cov_outputs, cov_kinds, self.structure)

    def batch_for(self, out_structure: str) -> torch.fx.Node | None:
        """The input's leading size, which full-structure rules take (made once, where first needed)."""
        if out_structure != "full":
            return None
        if self.batch is None and self.first_input is not None:
            self.batch = self.graph.call_function(torch.ops.aten.sym_size.int, (self.first_input, 0))
        return self.batch

    @staticmethod
    def looked_up(table: dict, keep: bool = False) -> Callable:
        """arg -> what ``table`` holds for it; non-nodes become None (or stay as they are with ``keep``)."""
        if keep:
            return lambda arg: table[arg] if isinstance(arg, torch.fx.Node) else arg
        return lambda arg: table.get(arg) if isinstance(arg, torch.fx.Node) else None

    def buffer(self, tensor: torch.Tensor) -> torch.fx.Node:
        name = f"fxstream_cov_{len(self.root._buffers)}"
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)


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


def output_variances(cov: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """An output's variances from its full covariance (output_cov="diag" where no linear layer made them)."""
    return full_to_diag(cov, mean.shape)


def _param_kind(uncertain: list[torch.fx.Node], kind: dict) -> str:
    kinds = {kind[n] for n in uncertain}
    return kinds.pop() if len(kinds) == 1 else "mixed:" + ",".join(sorted(map(str, kinds)))


def _marginal_structure(rule, out_structure: str) -> str | None:
    """"diag" where an op mixes or copies the entries of a diagonal parameter posterior before they meet data.

    Such an op (an index into a bias table, a repeat, a kernel standardised by its
    own statistics, a convolution of a fixed positional grid) correlates its
    outputs. Its rule's diagonal structure gives each output entry's variance
    (exact for the routing ops, first order otherwise); the result stays a
    ``param_diag`` whose entries later rules treat as independent, so the
    correlation between them is dropped. The backend warns where this happens.
    """
    if out_structure == "param_diag" and rule is not None and not rule.param_passthrough and "diag" in rule.structures:
        return "diag"
    return None


#: What to do about ops that have no rule but a known way around them.
NO_RULE_REMEDIES = {
    aten._transformer_encoder_layer_fwd.default: "PyTorch's fused inference kernel of nn.TransformerEncoderLayer",
    aten._native_multi_head_attention.default: "PyTorch's fused inference kernel of nn.MultiheadAttention",
}
_FASTPATH_REMEDY = ("; call torch.backends.mha.set_fastpath_enabled(False) before torch.compile so that Dynamo "
                    "captures the layer's ops (fxstream.streamline does this itself)")


def _unit_dims_aside(shape: tuple | None) -> tuple | None:
    """A shape without its size-1 dims: two tensors alike in it hold the same elements in the same order."""
    return None if shape is None else tuple(size for size in shape if size != 1)


def _rule_problem(rule, out_structure: str, uncertain, kind, op=None) -> str | None:
    """Why ``rule`` cannot produce ``out_structure`` here, or None when it can."""
    if rule is None:
        return NO_RULE_REMEDIES[op] + _FASTPATH_REMEDY if op in NO_RULE_REMEDIES else ""
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
