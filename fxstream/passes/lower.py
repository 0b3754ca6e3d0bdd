"""lower: the rewritten graph traced once to plain ATen, then run as FX or compiled by Inductor.

After pairing, covariance nodes call rule functions, which build a
``RuleCall`` and may differentiate with ``torch.func`` (JVPs of
nonlinearities, elementwise regions, linearised norms). Lowering runs that
Python once, under ``make_fx`` on the graph's own fake tensors, and keeps
only the ATen ops it dispatches: rules, derivatives and vmaps are evaluated
at trace time. A graph Dynamo captured with symbolic sizes is traced with
those symbols, so one lowered graph serves every batch size and sequence
length its guards admit; a size the rules had to fix becomes a guard in
Dynamo's shape environment (the one the trace shares), never a silent
constant. Per call nothing remains but the ATen ops: no rule code and no
forward-mode AD, whose levels are thread-local state.

Covariance buffers (posterior variances and factors) stay attributes of the
lowered module, the same tensor objects the paired graph holds, so a
posterior updated in place is what the next call reads.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._ops import OpOverload
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import FxstreamError

Backend = Literal["inductor", "eager"]


class _Lifted(torch.fx.Interpreter):
    """Runs a graph with the tensors it reads by ``get_attr`` taken from ``lifted`` instead."""

    def __init__(self, graph_module: torch.fx.GraphModule, lifted: dict[str, torch.Tensor]) -> None:
        super().__init__(graph_module)
        self.lifted = lifted

    def get_attr(self, target, args, kwargs) -> Any:
        return self.lifted[target] if target in self.lifted else super().get_attr(target, args, kwargs)


def tensor_attributes(graph_module: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the graph reads with ``get_attr`` (covariance buffers, copied constants), by target."""
    found = {}
    for node in graph_module.graph.find_nodes(op="get_attr"):
        value = _attribute(graph_module, node.target)
        if isinstance(value, torch.Tensor):
            found[node.target] = value
    return found


def _attribute(root: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _set_buffer(root: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    *path, name = target.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    root.register_buffer(name, tensor)


def _rename_colliding_constants(traced: torch.fx.GraphModule, lifted: set[str]) -> None:
    """Move the constants make_fx recorded (tensors a rule made from Python numbers, ``_tensor_constant<i>``)
    off the names of lifted attributes, which are set on ``traced`` afterwards and would replace them."""
    for node in traced.graph.find_nodes(op="get_attr"):
        if node.target not in lifted:
            continue
        fresh, count = f"{node.target}_traced", 0
        while hasattr(traced, fresh):
            count += 1
            fresh = f"{node.target}_traced{count}"
        setattr(traced, fresh, _attribute(traced, node.target))
        node.target = fresh


def _is_symbolic(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)


def lower_to_aten(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph traced to ATen ops with the same placeholders and outputs; rule calls evaluated away.

    The placeholders' ``val`` metadata (fake tensors, symbolic where Dynamo
    made sizes dynamic) are the trace's inputs; tensors read by ``get_attr``
    are traced as extra inputs and read back as the same attributes.
    """
    placeholders = list(graph_module.graph.find_nodes(op="placeholder"))
    values = [node.meta.get("val") for node in placeholders]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        raise FxstreamError("lower needs the rewritten graph's placeholder metadata (fake tensors from capture)")
    attributes = tensor_attributes(graph_module)
    names = list(attributes)
    fake_attributes = [fake_mode.from_tensor(attributes[name], static_shapes=True) for name in names]
    count = len(placeholders)

    def run(*args):
        return _Lifted(graph_module, dict(zip(names, args[count:]))).run(*args[:count])

    mode = "symbolic" if any(_is_symbolic(v) for v in values) else "fake"
    # opt_einsum plans a contraction order from concrete sizes, which would fix every symbolic size an
    # einsum of three operands sees; without it torch contracts left to right, the order the rules write.
    # (A process-wide flag, set only while Dynamo's compile lock is held.)
    with torch.backends.opt_einsum.flags(enabled=False):
        traced = make_fx(run, tracing_mode=mode)(*values, *fake_attributes)
    graph = traced.graph
    _rename_colliding_constants(traced, set(names))
    new_placeholders = list(graph.find_nodes(op="placeholder"))
    for node, old in zip(new_placeholders, placeholders):
        node._rename(old.name)
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, name in zip(new_placeholders[count:], names):
        _set_buffer(traced, name, attributes[name])
        with graph.inserting_before(first_op):
            read = graph.get_attr(name)
        read.meta = dict(node.meta)
        node.replace_all_uses_with(read)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    traced.recompile()
    return traced


#: torch's functions of symbolic sizes, which a trace with symbolic sizes records (a sum of sizes: sym_sum).
SIZE_FUNCTIONS = frozenset({torch.sym_sum, torch.sym_max, torch.sym_min, torch.sym_float, torch.sym_int,
                            torch.sym_not, torch.sym_ite})


def is_plain_aten(node: torch.fx.Node) -> bool:
    """Whether a call in a lowered graph is an ATen (or symbolic-size) op, never Python rule code."""
    if node.op != "call_function":
        return node.op in ("placeholder", "get_attr", "output")
    target = node.target
    return isinstance(target, OpOverload) or target is operator.getitem or target in SIZE_FUNCTIONS or \
        getattr(target, "__module__", "") in ("_operator", "operator", "math")


def compile_graph(graph_module: torch.fx.GraphModule, example_inputs: list, backend: Backend) -> Callable:
    """A callable running a lowered graph: Inductor-compiled, or the GraphModule itself."""
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph_module, example_inputs)
    raise FxstreamError(f"unknown backend '{backend}'; use 'inductor' or 'eager'")
