"""Capture a model with symbolic sizes, so costs come out as formulas in batch, seq, ...

Only the dimensions the caller names become symbolic (``mark_dynamic``); every
other size is specialised. Dynamo's shape symbols (``s33``) are renamed after
the input dimension they came from, so a byte count reads ``4096*batch*seq``.
"""

from __future__ import annotations

from collections.abc import Mapping
import types
from dataclasses import dataclass

import sympy
import torch
import torch._dynamo

from ..api import select_output
from ..errors import CaptureError, GraphBreakError
from ..passes import CapturedGraph, capture
from ..passes.capture import CAPTURING

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
    given_sizes: dict[str, int]
    """The sizes of the caller's example, where capture widened a size-1 dimension to 2 (else example_sizes)."""

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


def capture_symbolic(model: torch.nn.Module, args: tuple, dims: Dims,
                     output: str | int | None = None) -> SymbolicCapture:
    """Capture ``model(*args)`` with the dimensions in ``dims`` symbolic; everything else static.

    The graph returns the one output a streamlined model predicts (``output``, as in
    :func:`fxstream.streamline`; default "logits" or the first tensor), so other outputs such as
    key/value caches are neither costed nor calibrated.

    A symbolic dimension of size 1 (one image, one token) is widened to 2 by repeating the input
    along it: Dynamo specialises sizes 0 and 1, so a size-1 example cannot make a formula.
    ``example_sizes`` and ``example_args`` are then the widened ones, ``given_sizes`` the caller's.
    """
    args = list(args)
    given: dict[str, int] = {}
    for (index, dim), name in dims.items():
        if not isinstance(args[index], torch.Tensor) or args[index].dim() <= dim:
            raise CaptureError(f"'{name}' is dim {dim} of input {index}, which is not a tensor with that dimension")
        given[name] = int(args[index].shape[dim])
        if given[name] == 0:
            raise CaptureError(f"the example input {index} is empty in dim {dim} ('{name}'); give at least one")
        if given[name] == 1:
            args[index] = torch.cat([args[index], args[index]], dim)
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    for (index, dim), _ in dims.items():
        torch._dynamo.mark_dynamic(args[index], dim)
    seen: dict = {}

    def backend(gm, example_inputs):
        # Classify the placeholders here: after the backend returns, Dynamo drops the
        # placeholders' "grapharg" (their sources), and without them a buffer looks like an input.
        try:
            seen["captured"] = capture(gm, example_inputs)
        except Exception as error:  # noqa: BLE001 - re-raised below, outside Dynamo's wrapping
            seen["error"] = error
        return gm.forward

    # A fresh code object per capture: Dynamo keeps its cache on the code object it compiles, so
    # this capture neither reuses an earlier one nor needs torch._dynamo.reset(), which would
    # discard every other model the user's process has compiled.
    compiled = torch.compile(_fresh_call(), backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad(), CAPTURING:
            compiled(model, output, *args)
    except torch._dynamo.exc.Unsupported as error:
        raise GraphBreakError(f"the model cannot be captured as one graph: {str(error).splitlines()[0]}") from None
    if "error" in seen:
        raise seen["error"]
    if "captured" not in seen:
        raise CaptureError("Dynamo did not hand the model's graph to fxstream (it ran the model without "
                           "compiling it); check torch._dynamo's logs for why")
    captured = _named_by_identity(seen["captured"], model)
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
    return SymbolicCapture(captured, symbols, example_sizes, renames, args, given)


def _call(model, output, *args):
    return select_output(model(*args), output)


def _fresh_call():
    """``_call`` with a code object of its own, so Dynamo's cache for it starts empty and dies with it."""
    return types.FunctionType(_call.__code__.replace(), _call.__globals__, "fxstream_capture")


def _named_by_identity(captured: CapturedGraph, model: torch.nn.Module) -> CapturedGraph:
    """Name parameters and buffers by identity with ``model``, whatever Dynamo's sources said.

    A placeholder holding one of the model's buffers (batch norm's running statistics) is a
    buffer, not a model input, even where its source was lost.
    """
    parameters = {id(p): name for name, p in model.named_parameters()}
    buffers = {id(b): name for name, b in model.named_buffers()}
    for placeholder in captured.placeholders:
        key = id(placeholder.tensor) if placeholder.tensor is not None else None
        if key in parameters:
            placeholder.role, placeholder.qualified_name = "parameter", parameters[key]
        elif key in buffers:
            placeholder.role, placeholder.qualified_name = "buffer", buffers[key]
    return captured
