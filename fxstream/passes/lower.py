"""lower: hand the rewritten graph to Inductor (C++ / Triton codegen) or run it as FX."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.fx

from ..errors import FxstreamError

Backend = Literal["inductor", "eager"]


def lower(graph_module: torch.fx.GraphModule, example_inputs: list, backend: Backend) -> Callable:
    """A callable running the rewritten graph: Inductor-compiled, or the GraphModule itself."""
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph_module, example_inputs)
    raise FxstreamError(f"unknown backend '{backend}'; use 'inductor' or 'eager'")
