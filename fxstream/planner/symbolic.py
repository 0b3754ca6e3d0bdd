"""Capture a model with symbolic sizes, so costs come out as formulas in batch, seq, ...

Only the dimensions the caller names become symbolic (``mark_dynamic``); every
other size is specialised. Dynamo's shape symbols (``s33``) are renamed after
the input dimension they came from, so a byte count reads ``4096*batch*seq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy
import torch
import torch._dynamo

from ..errors import CaptureError, GraphBreakError
from ..passes import CapturedGraph, capture

Dims = Mapping[tuple[int, int], str]
"""(positional input index, dimension) -> size name, e.g. {(0, 0): "batch", (0, 1): "seq"}."""


@dataclass
class SymbolicCapture:
    """A captured graph whose shapes are expressions in named size symbols."""

    captured: CapturedGraph
    symbols: dict[str, sympy.Symbol]
    example_sizes: dict[str, int]
    renames: dict[sympy.Symbol, sympy.Symbol]
    example_args: tuple

    def expr(self, size) -> sympy.Expr:
        """A (Sym)Int as a sympy expression in the named symbols."""
        if isinstance(size, torch.SymInt):
            return sympy.sympify(size.node.expr).xreplace(self.renames)
        return sympy.Integer(int(size))

    def graph_inputs(self, sizes: Mapping[str, int], make_input) -> list:
        """Inputs for the captured graph at other sizes: ``make_input(placeholder, shape)`` builds tensors."""
        values = []
        for placeholder, node in zip(self.captured.placeholders,
                                     self.captured.graph_module.graph.find_nodes(op="placeholder")):
            val = node.meta.get("val")
            if placeholder.role == "symbol":
                values.append(int(self.expr(val).subs(_subs(self, sizes))))
            elif placeholder.role == "input":
                shape = [int(self.expr(s).subs(_subs(self, sizes))) for s in val.shape]
                values.append(make_input(placeholder, shape))
            else:
                values.append(placeholder.tensor)
        return values


def _subs(capture_: SymbolicCapture, sizes: Mapping[str, int]) -> dict:
    return {capture_.symbols[name]: value for name, value in sizes.items() if name in capture_.symbols}


def capture_symbolic(model: torch.nn.Module, args: tuple, dims: Dims) -> SymbolicCapture:
    """Capture ``model(*args)`` with the dimensions in ``dims`` symbolic; everything else static."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    for (index, dim), _ in dims.items():
        if args[index].shape[dim] < 2:
            raise CaptureError(f"the example input {index} needs size >= 2 in dim {dim} to make it symbolic")
        torch._dynamo.mark_dynamic(args[index], dim)
    seen: dict = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args)
    except torch._dynamo.exc.Unsupported as error:
        raise GraphBreakError(f"the model cannot be captured as one graph: {str(error).splitlines()[0]}") from None
    captured = capture(seen["gm"], seen["inputs"])
    renames: dict[sympy.Symbol, sympy.Symbol] = {}
    symbols: dict[str, sympy.Symbol] = {}
    example_sizes: dict[str, int] = {}
    placeholders = dict(zip((p.name for p in captured.placeholders),
                            captured.graph_module.graph.find_nodes(op="placeholder")))
    by_identity = {id(p.tensor): p for p in captured.inputs()}
    for (index, dim), name in dims.items():
        placeholder = by_identity.get(id(args[index]))
        if placeholder is None:
            raise CaptureError(f"input {index} does not reach the captured graph, so it cannot size '{name}'")
        size = placeholders[placeholder.name].meta["val"].shape[dim]
        if not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
            raise CaptureError(f"the model specialises dim {dim} of input {index} ('{name}'); it cannot vary")
        symbol = sympy.Symbol(name, positive=True, integer=True)
        renames[size.node.expr] = symbol
        symbols[name] = symbol
        example_sizes[name] = int(args[index].shape[dim])
    return SymbolicCapture(captured, symbols, example_sizes, renames, args)
