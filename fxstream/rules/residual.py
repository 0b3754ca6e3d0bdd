"""Residual joins: the covariance between a skip path and the branch it skips.

``h + f(h)`` adds two functions of one tensor, and the add rule treats them as
independent. To first order Cov(h, f(h)) = S_h J_f^T, whose diagonal under
diagonal activations is v_h * diag(J_f), so

    var(h + f(h)) = v_h + var f(h) + 2 v_h * diag(J_f).

Trained branches partly cancel what they receive (diag(J_f) < 0), so without
the last term the variances come out too large: SmolLM2-135M's logit variances
were 1.75x Monte Carlo's. With ``residual="linearised"`` the pair pass adds it
for every branch whose Jacobian diagonal can be had without forming J_f: ops
that act per element (elementwise ops, views that keep the last dim, eval
dropout, layer norm with its statistics at the mean) around at most two linear
maps, one into the branch and one back out:

    after the first map M:   J = sum_t diag(a_t) M_t diag(g_t)        (a term per map)
    after the second, M2:    diag(J) = sum_t (a_t @ (M2^T o M_t)) * g_t (one GEMM per term)

The Jacobian is carried as such a form through the branch, evaluated at the
means the graph already holds. A branch with anything else (attention mixes
tokens) keeps the independent add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.fx
from torch.fx.node import map_aggregate

from .linearise import derivative
from .norm import layer_statistics
from .patterns import TRANSPARENT
from .region import ELEMENTWISE_OPS

aten = torch.ops.aten

#: ops that pass every element through unchanged (in eval mode), in any layout keeping the last dim.
PASS_THROUGH = frozenset(TRANSPARENT) | {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
PER_ELEMENT = ELEMENTWISE_OPS | {aten._to_copy.default}
LINEAR_MAPS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default})
JOINS = {aten.add.Tensor: 1.0, aten.sub.Tensor: -1.0}


class NotCarried(Exception):
    """The branch has an op whose Jacobian the forms below cannot carry."""


@dataclass
class Diagonal:
    """J = diag(d) (``exact``), or only the diagonal d of J is known (after the second map)."""

    d: torch.Tensor
    exact: bool


@dataclass
class Chain:
    """J = sum_t diag(a_t) M_t diag(g_t); a_t (rows, K) or None for ones, M_t (K, n), g_t (rows, n)."""

    terms: dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]


Form = Union[Diagonal, Chain]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scaled(form: Form, e: torch.Tensor) -> Form:
    """diag(e) J."""
    e = _rows(e)
    if isinstance(form, Diagonal):
        return Diagonal(e * form.d, form.exact)
    return Chain({k: (e if a is None else e * a, m, g) for k, (a, m, g) in form.terms.items()})


def _sum(first: Form, second: Form) -> Form:
    if isinstance(first, Diagonal) and isinstance(second, Diagonal):
        return Diagonal(first.d + second.d, first.exact and second.exact)
    if isinstance(first, Chain) and isinstance(second, Chain):
        terms = dict(first.terms)  # both scaled by their op's slopes, so every a_t is a tensor
        for key, (a, m, g) in second.terms.items():
            terms[key] = (a + terms[key][0] if key in terms else a, m, g)
        return Chain(terms)
    raise NotCarried("a branch adds a diagonal and a mapped path")


def _through_map(form: Form, m: torch.Tensor, key: str) -> Form:
    """The form of x @ m^T: a first map starts a chain, a second one leaves only the diagonal."""
    if isinstance(form, Diagonal):
        if not form.exact:
            raise NotCarried("a third linear map")
        return Chain({key: (None, m, form.d)})
    total = None
    for a, first, g in form.terms.values():
        if m.shape[0] != first.shape[1]:
            raise NotCarried("the second map does not return to the branch's input width")
        product = m.t() * first
        along = product.sum(0).expand_as(g) if a is None else a @ product
        total = along * g if total is None else total + along * g
    return Diagonal(total, exact=False)


def _final_diagonal(form: Form) -> torch.Tensor:
    """diag(J) of the branch's output."""
    if isinstance(form, Diagonal):
        return form.d
    total = None
    for a, m, g in form.terms.values():
        if m.shape[0] != m.shape[1]:
            raise NotCarried("one linear map that changes the width")
        term = m.diagonal() * g if a is None else a * m.diagonal() * g
        total = term if total is None else total + term
    return total


@dataclass(frozen=True)
class Step:
    """One branch op: ``target(*args, **kwargs)`` with ``Ref``s to values; its value is ``means[index]``."""

    target: object
    args: tuple
    kwargs: dict
    index: int
    held: bool


@dataclass(frozen=True)
class Ref:
    """The position of a node's mean in the tuple a branch is evaluated on."""

    index: int


class ResidualBranch(torch.nn.Module):
    """The ops from a fork h to the branch output f(h), and how to evaluate diag(J_f) on their means."""

    def __init__(self, steps: list[Step], fork: int, norm: str) -> None:
        super().__init__()
        self.steps, self.fork, self.norm = steps, fork, norm
        #: per step, every value it reads (args and kwargs, nested ones too)
        self.reads = [[r.index for r in _refs((step.args, step.kwargs))] for step in steps]
        last_read = {index: position for position, reads in enumerate(self.reads) for index in reads}
        #: per step, the forms no later step reads (freed there: a branch's forms are activation-sized)
        self.done_after = [[index for index, position in last_read.items() if position == at] for at in range(len(steps))]

    def diagonal(self, means: tuple) -> torch.Tensor:
        """diag(J_f) (rows, width) at the means; raises NotCarried where the forms cannot carry it."""
        forms: dict[int, Form | NotCarried] = {self.fork: Diagonal(torch.ones_like(_rows(means[self.fork])), exact=True)}
        for step, reads, done in zip(self.steps, self.reads, self.done_after):
            if not step.held:
                formed = [(i, forms[a.index]) for i, a in enumerate(step.args) if isinstance(a, Ref) and a.index in forms]
                if len(formed) != len([index for index in reads if index in forms]):
                    forms[step.index] = NotCarried(f"{step.target} takes the branch inside a list or as a keyword")
                elif formed:
                    forms[step.index] = self._form(step, formed, means)
            for index in done:
                forms.pop(index, None)
        last = forms.get(self.steps[-1].index)
        if last is None:
            raise NotCarried("the branch output is held at its mean")
        if isinstance(last, NotCarried):
            raise last
        return _final_diagonal(last)

    def _form(self, step: Step, formed: list, means: tuple) -> Form | NotCarried:
        """The step's form, or the reason it has none (raised only if a later step needs it:
        statistics that a held norm reads are computed from the branch, and never needed)."""
        for _, form in formed:
            if isinstance(form, NotCarried):
                return form
        args = tuple(map_aggregate(step.args, lambda a: means[a.index] if isinstance(a, Ref) else a))
        kwargs = dict(map_aggregate(step.kwargs, lambda a: means[a.index] if isinstance(a, Ref) else a))
        try:
            return self._carry(step, args, kwargs, formed, means[step.index])
        except NotCarried as reason:
            return reason

    def _carry(self, step: Step, args: tuple, kwargs: dict, formed: list, out: torch.Tensor) -> Form:
        target = step.target
        if target in PASS_THROUGH:
            if (target is aten.dropout.default and args[2]) or out.shape[-1] != args[0].shape[-1]:
                raise NotCarried(str(target))
            return formed[0][1]
        if target in LINEAR_MAPS:
            if [i for i, _ in formed] != [1 if target is aten.addmm.default else 0] or kwargs:
                raise NotCarried(f"{target} of two uncertain operands")
            if target is aten.linear.default:
                return _through_map(formed[0][1], args[1], str(step.index))
            weight = args[2] if target is aten.addmm.default else args[1]
            if weight.dim() != 2:
                raise NotCarried(f"batched {target}")
            return _through_map(formed[0][1], weight.t(), str(step.index))
        if target is aten.layer_norm.default:
            if self.norm != "paper" or [i for i, _ in formed] != [0]:
                raise NotCarried("layer_norm through its statistics")
            x, shape = args[0], args[1]
            gamma = args[2] if len(args) > 2 else None
            _, inv_std = layer_statistics(x, len(shape), args[4] if len(args) > 4 else 1e-5)
            return _scaled(formed[0][1], inv_std.expand_as(x) if gamma is None else gamma * inv_std)
        if target in PER_ELEMENT:
            total = None
            for position, form in formed:
                if args[position].shape != out.shape:
                    raise NotCarried(f"{target} broadcasts an uncertain operand")
                slope = derivative(_holding_others(target, args, kwargs, position), args[position])
                part = _scaled(form, slope.to(out.dtype))
                total = part if total is None else _sum(total, part)
            return total
        raise NotCarried(str(target))


def _refs(structure) -> list[Ref]:
    found: list[Ref] = []
    map_aggregate(structure, lambda a: found.append(a) if isinstance(a, Ref) else None)
    return found


def _holding_others(target, args: tuple, kwargs: dict, position: int):
    def op_of(x: torch.Tensor) -> torch.Tensor:
        return target(*args[:position], x, *args[position + 1:], **kwargs)

    return op_of


@dataclass
class ResidualJoin:
    """An add or sub of a tensor (``fork``) and a branch computed from it, ``sign`` on the branch."""

    fork: torch.fx.Node
    inputs: list[torch.fx.Node]
    branch: ResidualBranch
    sign: float


def residual_joins(graph: torch.fx.Graph, held: set[torch.fx.Node], norm: str) -> dict[torch.fx.Node, ResidualJoin]:
    """Every add/sub of a tensor and a branch of it whose Jacobian diagonal the forms carry.

    Each candidate is evaluated once, on meta tensors of its example values'
    shapes, to find out whether its branch can be carried.
    """
    found = {}
    for node in graph.nodes:
        sign = JOINS.get(node.target) if node.op == "call_function" else None
        if sign is None or len(node.args) < 2 or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            continue
        scale = sign * float(node.kwargs.get("alpha", 1))  # the product of the two operands' coefficients
        first, second = node.args[:2]
        for fork, out in ((first, second), (second, first)):
            nodes = _branch(fork, out)
            join = None if nodes is None else _build(fork, nodes, held, norm, scale)
            if join is not None:
                found[node] = join
                break
    return found


def _branch(fork: torch.fx.Node, out: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes on paths from ``fork`` to ``out`` (graph order, ``out`` last), None when there are none."""
    below = {fork}
    for node in fork.graph.nodes:
        if any(n in below for n in node.all_input_nodes):
            below.add(node)
    if out is fork or out not in below:
        return None
    on_path, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node not in on_path and node is not fork:
            on_path.add(node)
            stack.extend(n for n in node.all_input_nodes if n in below)
    return [n for n in out.graph.nodes if n in on_path]


def _build(fork, nodes, held, norm, sign) -> ResidualJoin | None:
    """The join of ``fork`` and the branch ``nodes``, None when the branch cannot be carried."""
    if fork.meta.get("val") is None or nodes[-1].meta.get("val") is None:
        return None
    if tuple(fork.meta["val"].shape) != tuple(nodes[-1].meta["val"].shape):
        return None
    index: dict[torch.fx.Node, int] = {fork: 0}
    inputs = [fork]

    def ref(arg):
        if not isinstance(arg, torch.fx.Node):
            return arg
        if arg not in index:
            index[arg] = len(inputs)
            inputs.append(arg)
        return Ref(index[arg])

    steps = []
    for node in nodes:
        if node.op != "call_function":
            return None
        args, kwargs = map_aggregate(node.args, ref), map_aggregate(dict(node.kwargs), ref)
        steps.append(Step(node.target, tuple(args), dict(kwargs), ref(node).index, node in held))
    branch = ResidualBranch(steps, 0, norm)
    if not _carried(branch, inputs):
        return None
    return ResidualJoin(fork, inputs, branch, sign)


def _carried(branch: ResidualBranch, inputs: list[torch.fx.Node]) -> bool:
    """Whether the branch's diagonal can be evaluated: tried once on meta tensors of the nodes' example
    shapes. Symbolic sizes are taken at their example values: evaluating under the graph's own fake
    mode would guard on them and specialise a symbolic capture (the planner's batch and seq)."""
    try:
        values = tuple(_example(n.meta.get("val")) for n in inputs)
        with torch.no_grad():
            branch.diagonal(values)
    except NotCarried:
        return False
    return True


def _example(value):
    """A meta tensor of ``value``'s example shape, or the example int of a (symbolic) size."""
    if isinstance(value, torch.Tensor):
        return torch.empty([_example(size) for size in value.shape], dtype=value.dtype, device="meta")
    if isinstance(value, torch.SymInt):
        if value.node.hint is None:
            raise NotCarried("a size without an example value")
        return value.node.hint
    if isinstance(value, (int, float, bool)):
        return value
    raise NotCarried(f"an input of type {type(value).__name__}")


def residual_covariance(branch: ResidualBranch, means: tuple, fork_var: torch.Tensor, into: torch.Tensor,
                        sign: float) -> torch.Tensor:
    """``into`` (the independent add's variance) plus 2 sign v_h * diag(J_f)."""
    cross = fork_var * branch.diagonal(means).reshape(fork_var.shape).to(fork_var.dtype)
    return into + (2 * sign) * cross


residual_covariance.__name__ = residual_covariance.__qualname__ = "cov_residual_join"
