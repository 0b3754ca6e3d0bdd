"""lower: hand the rewritten graph to Inductor (C++ / Triton codegen) or run it as FX."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx

from ..errors import FxstreamError

Backend = Literal["inductor", "eager"]


def lower(graph_module: torch.fx.GraphModule, example_inputs: list, backend: Backend) -> Callable:
    """A callable running the rewritten graph: Inductor-compiled, or the GraphModule itself."""
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        if _is_dynamic(graph_module):
            return ShapeSpecialised(graph_module)
        return _compile(graph_module, example_inputs)
    raise FxstreamError(f"unknown backend '{backend}'; use 'inductor' or 'eager'")


def _compile(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph_module, example_inputs)


def _is_dynamic(graph_module: torch.fx.GraphModule) -> bool:
    for node in graph_module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


class ShapeSpecialised:
    """Inductor code per concrete input shape, for graphs Dynamo captured with symbolic shapes.

    The rules' vmap/JVP tracing does not support symbolic sizes inside Inductor,
    so a dynamic graph is compiled once per distinct shape signature (the
    behaviour of ``torch.compile(dynamic=False)``), from a copy with the
    symbolic metadata dropped.
    """

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, *args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        fn = self.compiled.get(key)
        if fn is None:
            static = copy.deepcopy(self.graph_module)
            for node in static.graph.nodes:
                node.meta.pop("val", None)
                node.meta.pop("example_value", None)
            fn = self.compiled[key] = _compile(static, list(args))
        return fn(*args)
