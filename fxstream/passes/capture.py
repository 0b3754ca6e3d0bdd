"""capture: a Dynamo graph re-traced to functional, layer-level ATen, with every placeholder classified.

Dynamo hands a backend a torch-level graph whose placeholders are the model's
inputs, parameters and buffers. Re-tracing it with ``make_fx(pre_dispatch=True)``
yields ATen ops at the granularity of layers (``aten.linear``, ``aten.conv2d``,
``aten.layer_norm``, ...), the unit at which covariance rules and per-layer
structure choices are made, while keeping ``nn_module_stack`` for messages.

The re-trace runs under PyTorch's own functionalization (export's pre-dispatch
mode, which keeps functional layer-level ops whole), so in-place and ``out=``
variants (``relu_``, ``add_``, ``dropout_``, ``copy_`` into a view) arrive as
their functional forms and the pair pass never sees a mutation.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch._dynamo
import torch.fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import CaptureError

PlaceholderRole = Literal["input", "parameter", "buffer", "symbol"]

_ATTRIBUTE = re.compile(
    r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']+)'\]"
)


class Capturing:
    """torch's switches set the way fxstream's Dynamo captures need them, entered around every capture and
    streamlined call (streamline, the planner, the zoo's check).

    - PyTorch's fused inference path of nn.TransformerEncoderLayer and nn.MultiheadAttention
      (``torch.backends.mha``) is off, so Dynamo captures their ATen ops, which have rules; the fused
      kernels have none. The flag is process-wide: a count of the captures and calls in flight restores it
      when the last one ends, so concurrent calls from several threads never see it on.
    - Dynamo traces nn.LSTM, nn.GRU and nn.RNN (``allow_rnn``, per thread) instead of breaking the graph.
    """

    def __init__(self) -> None:
        self.lock, self.active, self.saved = threading.Lock(), 0, True
        # One patch object, re-entered: its prior values live in a context variable (per thread, nestable).
        self.dynamo = torch._dynamo.config.patch(allow_rnn=True)

    def __enter__(self) -> None:
        with self.lock:
            if self.active == 0:
                self.saved = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            self.active += 1
        self.dynamo.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.dynamo.__exit__(*exc)
        with self.lock:
            self.active -= 1
            if self.active == 0:
                torch.backends.mha.set_fastpath_enabled(self.saved)


CAPTURING = Capturing()


@dataclass
class Placeholder:
    """One graph input: what it is and, for parameters and buffers, its dotted name."""

    name: str
    role: PlaceholderRole
    qualified_name: str | None = None
    tensor: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class CapturedGraph:
    """The ATen graph of a model plus what each of its placeholders stands for."""

    graph_module: torch.fx.GraphModule
    placeholders: list[Placeholder]
    example_inputs: list

    def parameters(self) -> dict[str, Placeholder]:
        return {p.qualified_name: p for p in self.placeholders if p.role == "parameter"}

    def inputs(self) -> list[Placeholder]:
        return [p for p in self.placeholders if p.role == "input"]


def qualified_name(source_name: str) -> str | None:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``."""
    root = re.match(r"^L\['[^']+'\]", source_name)
    if root is None:
        return None
    parts = [next(g for g in groups if g) for groups in _ATTRIBUTE.findall(source_name[root.end():])]
    return ".".join(parts) or None


def _classify(node: torch.fx.Node, value) -> Placeholder:
    if not isinstance(value, torch.Tensor):
        return Placeholder(node.name, "symbol")
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None else ""
    source = source() if callable(source) else source
    if "._parameters[" in source or isinstance(value, torch.nn.Parameter):
        return Placeholder(node.name, "parameter", qualified_name(source), value)
    if "._buffers[" in source:
        return Placeholder(node.name, "buffer", qualified_name(source), value)
    return Placeholder(node.name, "input", None, value)


def _is_symbolic(value) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)


def capture(dynamo_gm: torch.fx.GraphModule, example_inputs: list) -> CapturedGraph:
    """Re-trace a Dynamo graph to pre-dispatch ATen and classify its placeholders."""
    nodes = list(dynamo_gm.graph.find_nodes(op="placeholder"))
    if len(nodes) != len(example_inputs):
        raise CaptureError(f"graph has {len(nodes)} inputs but {len(example_inputs)} example inputs were given")
    placeholders = [_classify(node, value) for node, value in zip(nodes, example_inputs)]
    fake_values = [node.meta.get("example_value") for node in nodes]
    # The placeholders' own mode: inside a backend the tracing context may hold another one.
    fake_mode = next((v.fake_mode for v in fake_values if isinstance(v, FakeTensor)), None)
    if fake_mode is None:
        raise CaptureError("the Dynamo graph carries no fake tensors; capture needs torch.compile's graph")
    # The fake tracing modes re-use the inputs' fake mode, so tensors the graph
    # creates itself (torch.arange position ids, constants) are fake in that same
    # mode; "symbolic" keeps a dynamic graph's sizes as the shape env's symbols.
    mode = "symbolic" if any(_is_symbolic(v) for v in fake_values) else "fake"
    with fx_traceback.preserve_node_meta(), enable_python_dispatcher(), \
            FunctionalTensorMode(pre_dispatch=True, export=True):
        aten_gm = make_fx(functional(torch.fx.Interpreter(dynamo_gm).run), pre_dispatch=True,
                          tracing_mode=mode)(*fake_values)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    for placeholder, node in zip(placeholders, aten_gm.graph.find_nodes(op="placeholder")):
        placeholder.name = node.name
    return CapturedGraph(aten_gm, placeholders, list(example_inputs))


def functional(fn):
    """``fn`` on functional tensors: every mutation it makes is traced as a functional op."""

    def unwrap(tensor: FunctionalTensor) -> torch.Tensor:
        torch._sync(tensor)
        return torch._from_functional_tensor(tensor.elem)

    def run(*args):
        out = fn(*pytree.tree_map_only(torch.Tensor, FunctionalTensor.to_functional, args))
        return pytree.tree_map_only(FunctionalTensor, unwrap, out)

    return run


def module_path(node: torch.fx.Node) -> str:
    """Where ``node`` comes from: the innermost module's dotted path and class, e.g. ``blocks.0.mlp (MLP)``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, module_type = list(stack.values())[-1]
    name = getattr(module_type, "__name__", str(module_type))
    dotted = qualified_name(path)
    return f"{dotted} ({name})" if dotted else f"the top-level forward of {name}"
