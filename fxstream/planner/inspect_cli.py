"""``fxstream inspect TARGET``: the rewritten graph, each mean beside its covariance, and what was pruned."""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys

import torch
import torch.fx
import torch.fx.traceback as fx_traceback

from ..backend import StreamlineOptions
from ..errors import UnsupportedOpError
from ..passes.decompose import DECOMPOSED_FROM
from ..passes.pair import ROLE, PairedGraph
from ..pipeline import rewrite
from .cost import _module
from .plan_cli import add_target_arguments, load_posterior, rule_options, target_on_device
from .symbolic import SymbolicCapture, capture_symbolic


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    parser = subparsers.add_parser(
        "inspect", help="show the rewritten graph: means, covariances, rules, pruning",
        description="Show how fxstream rewrites TARGET: every mean node beside its covariance node and the rule "
                    "that made it, and which covariance was pruned and why. --format code shows the rewritten "
                    "graph as the ATen ops it runs at the example input, the rules' bodies inlined.")
    add_target_arguments(parser)
    parser.add_argument("--activation-cov", choices=("diag", "full"), default="diag",
                        help="activation covariance structure (default diag)")
    parser.add_argument("--format", choices=("table", "code", "dot", "json"), default="table", help="output format")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    parser.set_defaults(run=run)


def placeholder_names(sym: SymbolicCapture) -> dict[str, str]:
    """Graph placeholder -> what it is: ``parameter 0.weight``, ``buffer bn.running_mean``, ``input 0``, ``size batch``."""
    names = {}
    symbols = {str(old): str(new) for old, new in sym.renames.items()}
    inputs = 0
    for placeholder, node in zip(sym.captured.placeholders,
                                 sym.captured.graph_module.graph.find_nodes(op="placeholder")):
        if placeholder.role in ("parameter", "buffer"):
            names[placeholder.name] = f"{placeholder.role} {placeholder.qualified_name or '?'}"
        elif placeholder.role == "input":
            names[placeholder.name] = f"input {inputs}"
            inputs += 1
        else:
            val = node.meta.get("val")
            expr = str(val.node.expr) if isinstance(val, torch.SymInt) else str(val)
            names[placeholder.name] = f"size {symbols.get(expr, expr)}"
    return names


def rows(paired: PairedGraph, pruned: dict[str, str], names: dict[str, str] | None = None) -> list[list[str]]:
    """One row per mean node of the rewritten graph: op, module, its covariance node and rule, or why none.

    ``names`` (placeholder -> what it is, see :func:`placeholder_names`) labels the graph's inputs.
    """
    names = names or {}
    graph = paired.graph_module.graph
    covs = {n.meta[ROLE]["of"]: n for n in graph.nodes if n.meta.get(ROLE, {}).get("role") == "cov"}
    table = []
    for node in graph.nodes:
        if node.meta.get(ROLE, {}).get("role") != "mean":
            continue
        op = str(node.target) if node.op == "call_function" else names.get(node.name, node.op)
        if DECOMPOSED_FROM in node.meta:
            op = f"{op} (decomposed {node.meta[DECOMPOSED_FROM]})"
        cov = covs.get(node.name)
        if cov is not None:
            rule = cov.meta[ROLE]["rule"]
            table.append([node.name, op, _module(node), cov.name, rule, "kept"])
        elif node.name in pruned:
            table.append([node.name, op, _module(node), "-", pruned[node.name],
                          "pruned: no requested output reads it"])
        else:
            table.append([node.name, op, _module(node), "-", "-", "deterministic: no uncertain input"])
    return table


def dot(paired: PairedGraph) -> str:
    """Graphviz DOT of the rewritten graph: means as boxes, covariances as filled ellipses."""
    lines = ["digraph fxstream {", "  rankdir=TB;"]
    for node in paired.graph_module.graph.nodes:
        info = node.meta.get(ROLE, {})
        if info.get("role") == "cov":
            label = f"{node.name}\\n[{info['rule']}]"
            style = 'shape=ellipse, style=filled, fillcolor="#f4c7a1"'
        else:
            label = f"{node.name}\\n{node.target if node.op == 'call_function' else node.op}"
            style = "shape=box"
        lines.append(f'  "{node.name}" [label="{label}", {style}];')
        lines.extend(f'  "{source.name}" -> "{node.name}";' for source in node.all_input_nodes)
    lines.append("}")
    return "\n".join(lines)


def identifier(what: str) -> str:
    """A Python name for a graph input from :func:`placeholder_names`: ``parameter blocks.0.fc.weight`` ->
    ``p_blocks_0_fc_weight``, ``buffer bn.running_mean`` -> ``b_bn_running_mean``, ``input 0`` -> ``input_0``,
    ``size batch`` -> ``batch``."""
    role, _, name = what.partition(" ")
    slug = re.sub(r"\W+", "_", name).strip("_")
    prefix = {"parameter": "p_", "buffer": "b_", "input": "input_"}.get(role, "")
    text = f"{prefix}{slug}" if slug else role
    return text if text.isidentifier() and not keyword.iskeyword(text) else f"_{text}"


class _Lifted(torch.fx.Interpreter):
    """Runs the rewritten graph with its posterior buffers given as arguments, so a trace shows them as inputs."""

    def __init__(self, gm: torch.fx.GraphModule, lifted: dict[str, torch.Tensor]) -> None:
        super().__init__(gm)
        self.lifted = lifted

    def get_attr(self, target, args, kwargs):
        return self.lifted[target] if target in self.lifted else super().get_attr(target, args, kwargs)


def _label(node: torch.fx.Node, module: str) -> str:
    info = node.meta.get(ROLE, {})
    where = f" in {module}" if module else ""
    if info.get("role") == "cov":
        return f"{node.name}: covariance of {info.get('of')} by the {info.get('rule')} rule{where}"
    target = node.target if node.op == "call_function" else node.op
    return f"{node.name}: mean, {target}{where}"


def aten_code(paired: PairedGraph, sym: SymbolicCapture, names: dict[str, str]) -> str:
    """The rewritten graph traced with make_fx at the example input: every rule's body as the ATen ops it runs.

    Inputs are named after what they are (parameters by their names, ``cov_<parameter>`` for a posterior
    buffer); a comment before each run of ops names the mean or covariance node they compute.
    """
    gm = paired.graph_module
    inputs = sym.graph_inputs(sym.example_sizes, lambda placeholder, shape: placeholder.tensor)
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    lifted = {}
    for node in attrs:
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            lifted[node.target] = value
    targets = list(lifted)

    def run(*flat):
        return _Lifted(gm, dict(zip(targets, flat[len(inputs):]))).run(*flat[:len(inputs)])

    labelled = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.meta["custom"] = {**node.meta.get("custom", {}), "fxstream": _label(node, _module(node))}
            labelled.append(node)
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        with fx_traceback.preserve_node_meta(), torch.no_grad():
            traced = make_fx(run, tracing_mode="real")(*inputs, *(lifted[t] for t in targets))
    finally:
        for node in labelled:
            node.meta["custom"].pop("fxstream", None)
    # Name the inputs: the graph's placeholders, then the lifted posterior buffers (cov_<parameter>).
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    wanted = [identifier(names[n.name]) if n.name in names else n.name for n in placeholders]
    by_placeholder = dict(zip((n.name for n in placeholders), wanted))
    owner = {n.target: n.meta.get(ROLE, {}).get("of") for n in attrs}
    wanted += [f"cov_{by_placeholder[owner[t]].removeprefix('p_')}" if owner.get(t) in by_placeholder else t
               for t in targets]
    for node, name in zip(traced.graph.find_nodes(op="placeholder"), wanted):
        node._rename(name)
        node.target = node.name
    traced.graph.eliminate_dead_code()
    traced.recompile()
    label_of = {n.name: n.meta.get("custom", {}).get("fxstream") for n in traced.graph.nodes}
    sizes = ", ".join(f"{k}={v}" for k, v in sym.example_sizes.items())
    lines, last = [f"# The rewritten graph as the ATen ops it runs at the example input ({sizes}), each rule's "
                   "body inlined;", "# a comment names the mean or covariance node each run of ops computes."], None
    for line in traced.code.strip("\n").splitlines():
        match = re.match(r"\s+(\w+) = ", line)
        label = label_of.get(match.group(1)) if match else None
        if label is not None and label != last:
            lines.append(f"    # {label}")
            last = label
        lines.append(line)
    return "\n".join(lines).strip("\n")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    target = target_on_device(args.target, args.device)
    posterior = load_posterior(target, args.posterior, args.variance)
    sym = capture_symbolic(target.model, target.args, target.dims)
    options = StreamlineOptions(posterior=posterior, activation_cov=args.activation_cov, model=target.model,
                                rule_options=rule_options(args))
    try:
        rewritten = rewrite(sym.captured, options)
    except UnsupportedOpError as error:
        if args.format == "json":
            print(json.dumps({"unsupported": [{"op": op, "module": where, "problem": problem}
                                              for op, where, problem in error.unsupported]}, indent=2))
        elif args.format == "table":
            print(tabulate([[op, where, problem] for op, where, problem in error.unsupported],
                           headers=["op", "module", "problem"]))
        raise
    paired, report = rewritten.paired, rewritten.report
    names = placeholder_names(sym)
    table = rows(paired, report.pruned_rules, names)
    if args.format == "code":
        try:
            print(aten_code(paired, sym, names))
        except Exception as error:  # noqa: BLE001 - the display falls back to the rule calls
            print(f"fxstream: note: cannot trace the rewritten graph to ATen ops ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); showing the rule calls", file=sys.stderr)
            print(paired.graph_module.code)
    elif args.format == "dot":
        print(dot(paired))
    elif args.format == "json":
        print(json.dumps({
            "target": args.target,
            "activation_cov": args.activation_cov,
            "rule_options": rule_options(args),
            "nodes": [{"mean": mean, "op": op, "module": module, "cov": None if cov == "-" else cov,
                       "rule": None if rule == "-" else rule, "status": status.split(":")[0],
                       "why": status.split(": ", 1)[1] if ": " in status else None}
                      for mean, op, module, cov, rule, status in table],
            "kept": report.kept, "pruned": report.pruned, "deterministic": report.deterministic,
            "decomposed": rewritten.decomposed,
        }, indent=2))
    else:
        print(tabulate(table, headers=["mean node", "op", "module", "cov node", "rule", "status"]))
        print(f"\ncovariance nodes kept {report.kept}, pruned {report.pruned}; "
              f"deterministic nodes {report.deterministic}; decomposed nodes {rewritten.decomposed}; "
              f"activation covariance {args.activation_cov}")
    return 0
