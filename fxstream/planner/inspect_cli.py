"""``fxstream inspect TARGET``: the rewritten graph, each mean beside its covariance, and what was pruned."""

from __future__ import annotations

import argparse

from ..backend import StreamlineOptions
from ..errors import UnsupportedOpError
from ..passes.decompose import DECOMPOSED_FROM
from ..passes.pair import ROLE, PairedGraph
from ..pipeline import rewrite
from .cost import _module
from .plan_cli import add_target_arguments, load_posterior, rule_options
from .symbolic import capture_symbolic
from .targets import load


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    parser = subparsers.add_parser(
        "inspect", help="show the rewritten graph: means, covariances, rules, pruning",
        description="Show how fxstream rewrites TARGET: every mean node beside its covariance node and the rule "
                    "that made it, and which covariance was pruned and why.")
    add_target_arguments(parser)
    parser.add_argument("--activation-cov", choices=("diag", "full"), default="diag",
                        help="activation covariance structure (default diag)")
    parser.add_argument("--format", choices=("table", "code", "dot"), default="table", help="output format")
    parser.set_defaults(run=run)


def rows(paired: PairedGraph, pruned: dict[str, str]) -> list[list[str]]:
    """One row per mean node of the rewritten graph: op, module, its covariance node and rule, or why none."""
    graph = paired.graph_module.graph
    covs = {n.meta[ROLE]["of"]: n for n in graph.nodes if n.meta.get(ROLE, {}).get("role") == "cov"}
    table = []
    for node in graph.nodes:
        if node.meta.get(ROLE, {}).get("role") != "mean":
            continue
        op = str(node.target) if node.op == "call_function" else node.op
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


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    target = load(args.target)
    posterior = load_posterior(target, args.posterior, args.variance)
    sym = capture_symbolic(target.model, target.args, target.dims)
    options = StreamlineOptions(posterior=posterior, activation_cov=args.activation_cov, model=target.model,
                                rule_options=rule_options(args))
    try:
        rewritten = rewrite(sym.captured, options)
    except UnsupportedOpError as error:
        print(tabulate([[op, where, problem] for op, where, problem in error.unsupported],
                       headers=["op", "module", "problem"]))
        raise
    paired, report = rewritten.paired, rewritten.report
    if args.format == "code":
        print(paired.graph_module.code)
    elif args.format == "dot":
        print(dot(paired))
    else:
        print(tabulate(rows(paired, report.pruned_rules), headers=["mean node", "op", "module", "cov node", "rule", "status"]))
        print(f"\ncovariance nodes kept {report.kept}, pruned {report.pruned}; "
              f"deterministic nodes {report.deterministic}; decomposed nodes {rewritten.decomposed}; "
              f"activation covariance {args.activation_cov}")
    return 0
