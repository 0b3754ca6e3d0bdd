"""decompose: replace ops that uncertainty reaches and no rule covers by PyTorch's own decompositions.

Rules are written where a decomposition would be slow or lose exactness
(linear, conv, norms, attention, ...). Any other op that an uncertainty source
reaches is looked up in PyTorch's decomposition tables (the core ATen set
Inductor uses, then the wider post-autograd table, then the op's own
CompositeImplicitAutograd kernel), traced at the node's example values and
inlined in its place (the prims ops of PyTorch's reference decompositions as
the ATen ops they equal, which have rules). The pieces are decomposed again where they lack rules,
so only an op with no rule and no decomposition into ruled ops reaches the
pair pass without a rule. Inlined nodes keep the original node's module stack
and record the op they came from (``node.meta["fxstream_decomposed_from"]``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._decomp import core_aten_decompositions, decomposition_table
from torch._dispatch.python import enable_python_dispatcher
from torch._ops import OpOverload
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from ..rules import RULES, VALUE_INDEPENDENT, rule_for
from .capture import CapturedGraph, functional

aten = torch.ops.aten

DECOMPOSED_FROM = "fxstream_decomposed_from"
#: Rounds of decomposing the pieces of a decomposition before giving up on an op.
MAX_DEPTH = 8
_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def decomposition(op: OpOverload) -> Callable | None:
    """PyTorch's decomposition of ``op``, or None where it has none."""
    for table in (_core_table(), decomposition_table):
        if op in table:
            return table[op]
    if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
        return op.decompose
    return None


_CORE: dict | None = None


def _core_table() -> dict:
    global _CORE
    if _CORE is None:
        _CORE = dict(core_aten_decompositions())
    return _CORE


def decompose(captured: CapturedGraph, sources: Collection[str], keep: Collection[torch.fx.Node] = ()) -> int:
    """Inline decompositions of the rule-less ops that the placeholders named in ``sources`` reach.

    ``keep``: nodes left alone (e.g. those the rule options hold at their means).
    Returns how many nodes were replaced.
    """
    gm = captured.graph_module
    replaced = 0
    for _ in range(MAX_DEPTH):
        todo = [node for node in _reached(gm.graph, sources) if node not in keep and _wants_decomposition(node)]
        done = sum(_inline(gm, node) for node in todo)
        replaced += done
        if not done:
            break
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return replaced


def _reached(graph: torch.fx.Graph, sources: Collection[str]) -> list[torch.fx.Node]:
    reached: set[torch.fx.Node] = set()
    order = []
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name in sources) or any(n in reached for n in node.all_input_nodes):
            reached.add(node)
            order.append(node)
    return order


def _floating(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_floating(v) for v in value)
    return isinstance(value, torch.Tensor) and torch.is_floating_point(value)


def _wants_decomposition(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, OpOverload) and rule_for(node.target) is None
            and node.target not in VALUE_INDEPENDENT and _floating(node.meta.get("val"))
            and decomposition(node.target) is not None)


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Replace ``node`` by the traced graph of its decomposition; False where it does not decompose."""
    op = node.target
    if isinstance(node.meta.get("val"), (list, tuple)) and any(u.target is not operator.getitem for u in node.users):
        return False
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    inputs = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.fx.Node)]
    values = [flat[i].meta.get("val") for i in inputs]
    if any(v is None for v in values):
        return False
    decompose_fn = decomposition(op)

    def call(*leaves):
        filled = list(flat)
        for i, value in zip(inputs, leaves):
            filled[i] = value
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return decompose_fn(*args, **kwargs)

    mode = "symbolic" if any(_symbolic(v) for v in values) else "fake"
    try:
        # Functionalized as capture is: a decomposition may update its own intermediates in place
        # (rms_norm adds eps with ``add_``), and the pair pass needs functional ops (and the RMSNorm
        # pattern of rules/patterns.py an out-of-place add).
        with enable_python_dispatcher(), FunctionalTensorMode(export=True):
            sub = make_fx(functional(call), tracing_mode=mode)(*values)
    except Exception:  # a decomposition that declines these arguments (NotImplemented, asserts)
        return False
    if any(n.op == "call_function" and n.target is op for n in sub.graph.nodes):
        return False
    graph = gm.graph
    env = dict(zip(sub.graph.find_nodes(op="placeholder"), (flat[i] for i in inputs)))
    new_nodes = []
    with graph.inserting_before(node):
        for sub_node in sub.graph.nodes:
            if sub_node.op in ("placeholder", "output"):
                continue
            if sub_node.op == "call_function" and isinstance(sub_node.target, type) \
                    and issubclass(sub_node.target, tuple):  # a structseq of outputs (torch.return_types)
                env[sub_node] = tuple(env[a] for a in sub_node.args)
                continue
            if sub_node.op == "get_attr":
                name = _constant_name(gm, sub_node.target)
                gm.register_buffer(name, getattr(sub, sub_node.target))
                env[sub_node] = graph.get_attr(name)
            else:
                env[sub_node] = graph.node_copy(sub_node, lambda n: env[n])
                _as_aten_twin(env[sub_node])
            new_nodes.append(env[sub_node])
    result = pytree.tree_map_only(torch.fx.Node, lambda n: env[n], next(iter(sub.graph.find_nodes(op="output"))).args[0])
    for new in new_nodes:
        new.meta.update({key: node.meta[key] for key in _KEPT_META if key in node.meta})
        new.meta[DECOMPOSED_FROM] = node.meta.get(DECOMPOSED_FROM, str(op))
    if isinstance(result, torch.fx.Node):
        node.replace_all_uses_with(result)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    return True


def _as_aten_twin(node: torch.fx.Node) -> None:
    """Point a prims op that PyTorch's reference decompositions emit at the ruled ATen op it equals.

    ``prims.where`` is ``aten.where.self``, ``prims.minimum`` is ``aten.minimum``, and so on for
    ops of the same name and arguments; ``prims.convert_element_type(x, dtype)`` is
    ``aten._to_copy(x, dtype=dtype)``.
    """
    op = node.target
    if not isinstance(op, OpOverload) or op.namespace != "prims":
        return
    if op is torch.ops.prims.convert_element_type.default:
        node.target, node.args, node.kwargs = aten._to_copy.default, node.args[:1], {"dtype": node.args[1]}
        return
    packet = getattr(aten, op.overloadpacket.__name__, None)
    for overload in ("default", "self", "Tensor"):
        twin = getattr(packet, overload, None) if packet is not None else None
        if twin in RULES and _positional(twin) >= len(node.args):
            node.target = twin
            return


def _positional(op: OpOverload) -> int:
    return sum(1 for argument in op._schema.arguments if not argument.kwarg_only)


def _constant_name(gm: torch.nn.Module, base: str) -> str:
    index = 0
    while hasattr(gm, f"fxstream_decomposed_{base}_{index}"):
        index += 1
    return f"fxstream_decomposed_{base}_{index}"


def _symbolic(value) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
