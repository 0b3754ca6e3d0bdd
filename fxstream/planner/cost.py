"""Cost model of a paired graph: bytes, FLOPs and peak memory as formulas in the symbolic sizes.

Bytes of every node come from the captured graph's symbolic shapes. A mean
node costs what its output tensor holds; a covariance node costs what its
structure implies for the mean it belongs to:

- activation "diag": one variance per element, the mean's bytes;
- activation "full": ``batch * (numel / batch)^2`` elements (a covariance over
  all non-batch elements of each sample);
- a parameter posterior ("param_diag", ...) held as static buffers.

Ops whose schema says their output aliases an input (views, ``t``, getitem)
allocate nothing, for means and covariances alike. Peak memory is a liveness
walk over a networkx view of the schedule (the graph's node order, which the eager GraphModule
follows): a tensor is live from the node that allocates it to its last
reader, and the peak is the Max over program points of the live bytes.
Tensors that exist before the call (inputs, weights, posterior buffers) are
counted once as static bytes.

What a node allocates inside itself (its workspace: a rule's vmap/jvp
tangents, a kernel's scratch) is its in-node peak as the allocator reports it
(torch.profiler memory events), and its FLOPs are what
``torch.utils.flop_counter`` counts (matmul, conv, attention); both are measured
per node at a small grid of sizes and fitted as the lowest-degree polynomials
in the size symbols that meet every grid point, exactly on a CPU and within
the allocator's 512-byte rounding on a GPU (the tests check them at sizes off
the grid, and against replayed rounding). The liveness
walk adds each node's in-node peak to the bytes of everything else alive at
that node.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import re
from collections.abc import Collection, Mapping
from fractions import Fraction
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from ..passes.joins import TIED
from ..passes.pair import RULE_KINDS, RULE_KW_KINDS, RULE_STRUCTURE, ROLE, PairedGraph, input_covariance
from .symbolic import SymbolicCapture

Sizes = Mapping[str, int]

DEGREES = {"batch": 1, "seq": 3}
"""Polynomial degree per size symbol when interpolating FLOPs and workspace (others: 3).

Every op works per sample, so costs are linear in the batch; sequence length
enters up to cubically (a full covariance over seq * width elements, pushed
through a linearised op).
"""


@dataclass
class NodeCost:
    """One node of the paired graph with what it costs."""

    name: str
    role: str
    of: str
    rule: str
    structure: str
    bytes: sympy.Expr
    alias_of: str | None
    static: bool
    reads: list[str] = field(default_factory=list)
    flops: sympy.Expr = sympy.Integer(0)
    workspace: list[sympy.Expr] = field(default_factory=list)
    module: str = ""


@dataclass
class CostReport:
    """Per-node costs plus the totals and the peak of a whole paired graph."""

    nodes: list[NodeCost]
    static_bytes: sympy.Expr
    symbols: dict[str, sympy.Symbol]
    exact: bool = True

    @property
    def peak_bytes(self) -> sympy.Expr:
        """Peak of the bytes live during the call (static tensors excluded): a Max over program points."""
        points = undominated([sympy.expand(p) for p in liveness_points(self.nodes)])
        return sympy.Max(*points) if points else sympy.Integer(0)

    @property
    def total_bytes(self) -> sympy.Expr:
        """Static bytes plus the working-memory peak: what a budget must cover."""
        return self.static_bytes + self.peak_bytes

    @property
    def flops(self) -> sympy.Expr:
        return sympy.Add(*(n.flops for n in self.nodes))

    @property
    def deterministic_flops(self) -> sympy.Expr:
        """FLOPs of the mean nodes alone: the deterministic forward's, the yardstick for ``flops``."""
        return sympy.Add(*(n.flops for n in self.nodes if n.role == "mean"))

    def evaluate(self, expr: sympy.Expr, sizes: Sizes) -> int:
        """An expression at concrete sizes (every symbol in it must be given)."""
        expr = sympy.sympify(expr).xreplace({self.symbols[k]: v for k, v in sizes.items() if k in self.symbols})
        if expr.free_symbols:
            raise ValueError(f"give a value for the size(s) {sorted(map(str, expr.free_symbols))}")
        return int(expr)

    def peak_at(self, sizes: Sizes) -> int:
        """Working-memory peak at concrete sizes (the liveness walk, evaluated numerically)."""
        return max(liveness_points(self.nodes, lambda e: self.evaluate(e, sizes)), default=0)

    def total_at(self, sizes: Sizes) -> int:
        return self.evaluate(self.static_bytes, sizes) + self.peak_at(sizes)


def _itemsize(value: torch.Tensor) -> int:
    return value.element_size() if hasattr(value, "element_size") else value.dtype.itemsize


def tensor_bytes(sym: SymbolicCapture, value) -> sympy.Expr:
    """Bytes of a tensor (or of every tensor of a tuple) with a symbolic shape."""
    if isinstance(value, (list, tuple)):
        return sympy.Add(*(tensor_bytes(sym, v) for v in value))
    if not isinstance(value, torch.Tensor):
        return sympy.Integer(0)
    numel = sympy.Mul(*(sym.expr(s) for s in value.shape))
    return sympy.expand(numel * _itemsize(value))


def batch_expr(sym: SymbolicCapture) -> sympy.Expr:
    """The batch size: dim 0 of the first tensor input."""
    for placeholder, node in zip(sym.captured.placeholders,
                                 sym.captured.graph_module.graph.find_nodes(op="placeholder")):
        if placeholder.role == "input":
            return sym.expr(node.meta["val"].shape[0])
    raise ValueError("the graph has no tensor input")


def covariance_bytes(sym: SymbolicCapture, mean_value, structure: str) -> sympy.Expr:
    """Bytes of the covariance of a tensor with this mean, in the given structure.

    For an op with several outputs (eval batch norm's (y, mean, rstd)), the covariances of its
    floating-point outputs; integer outputs (indices) carry none.
    """
    if isinstance(value := mean_value, (list, tuple)):
        return sympy.Add(*(covariance_bytes(sym, v, structure) for v in value
                           if isinstance(v, torch.Tensor) and torch.is_floating_point(v)))
    if structure == "full":
        batch = batch_expr(sym)
        per_sample = tensor_bytes(sym, mean_value) / _itemsize(mean_value) / batch
        return sympy.expand(batch * per_sample**2 * _itemsize(mean_value))
    return tensor_bytes(sym, mean_value)


def _aliases(node: torch.fx.Node) -> bool:
    """True when the op's output is a view of an input (per its schema), so it allocates nothing."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _structure(node: torch.fx.Node, kinds: dict[str, str]) -> str:
    if "structure" in node.meta.get(ROLE, {}):
        return node.meta[ROLE]["structure"]
    if node.target is input_covariance:
        return node.args[3]
    if node.target is operator.getitem:
        return kinds.get(node.args[0].name, "diag")
    if node.op == "call_function" and len(node.args) > RULE_STRUCTURE:
        return node.args[RULE_STRUCTURE]
    return "param"


def node_costs(sym: SymbolicCapture, paired: PairedGraph) -> list[NodeCost]:
    """Every node of the paired graph, in schedule order, with its bytes."""
    graph = paired.graph_module.graph
    originals = {n.name: n for n in sym.captured.graph_module.graph.nodes}
    means = {n.name: n for n in graph.nodes if n.meta.get(ROLE, {}).get("role") == "mean"}
    kinds: dict[str, str] = {}
    costs = []
    for node in graph.nodes:
        info = node.meta.get(ROLE, {})
        reads = [n.name for n in node.all_input_nodes]
        if node.op == "output":
            costs.append(NodeCost(node.name, "output", "", "", "", sympy.Integer(0), None, False, reads))
            continue
        module = _module(originals.get(info.get("of", node.name)))
        if info.get("role") == "mean":
            value = node.meta.get("val")
            static = node.op in ("placeholder", "get_attr")
            alias = node.all_input_nodes[0].name if _aliases(node) and node.all_input_nodes else None
            nbytes = sympy.Integer(0) if alias else tensor_bytes(sym, value)
            costs.append(NodeCost(node.name, "mean", node.name, "", "", nbytes, alias, static, reads, module=module))
            continue
        rule = info.get("rule", "")
        if node.op == "get_attr":  # posterior buffers, or a region's function (no bytes)
            tensor = getattr(paired.graph_module, node.target)
            nbytes = sympy.Integer(tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0)
            kinds[node.name] = "param"
            costs.append(NodeCost(node.name, "cov", info.get("of", ""), rule, "param", nbytes, None, True, reads,
                                  module=module))
            continue
        structure = _structure(node, kinds)
        kinds[node.name] = structure
        mean_node = means.get(info.get("of", ""))
        mean_alias = mean_node is not None and _aliases(mean_node) and node.target is not input_covariance
        cov_inputs = [n for n in node.all_input_nodes if n.meta.get(ROLE, {}).get("role") == "cov"]
        given_full_input = node.target is input_covariance and (node.args[2] == "full" or structure == "diag")
        own_view = "with" in info and _aliases(node)  # a cross-covariance read transposed
        if mean_alias or own_view or node.target is operator.getitem or given_full_input:
            base = (cov_inputs or node.all_input_nodes[-1:])[0]
            costs.append(NodeCost(node.name, "cov", info.get("of", ""), rule, structure, sympy.Integer(0),
                                  base.name, False, reads, module=module))
            continue
        value = mean_node.meta.get("val") if mean_node is not None else None
        if structure == TIED:  # a parameter read twice, its covariance dense under joins="exact": (N, N)
            nbytes = tensor_bytes(sym, value) * value.numel()
        elif structure.startswith("param"):
            nbytes = tensor_bytes(sym, value)
        elif "with" in info:  # a cross-covariance Cov(t, u) of joins="exact": (B, N_t, N_u), u maybe a parameter
            other = means[info["with"]].meta.get("val")
            per_sample = other.numel() if info.get("with_parameter") else tensor_bytes(sym, other) / (
                batch_expr(sym) * _itemsize(other))
            nbytes = sympy.expand(tensor_bytes(sym, value) * per_sample)
        else:
            nbytes = covariance_bytes(sym, value, structure)
        costs.append(NodeCost(node.name, "cov", info.get("of", ""), rule, structure, nbytes, None, False, reads,
                              module=module))
    return costs


_PATH_PART = re.compile(r"\._modules\['([^']+)'\]|\['([^']+)'\]|\.(\w+)")


def _module(node: torch.fx.Node | None) -> str:
    """The dotted path of the innermost module that produced ``node`` ("" at top level)."""
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    rest = re.sub(r"^L\['[^']+'\]", "", path)
    return ".".join(next(g for g in groups if g) for groups in _PATH_PART.findall(rest))


def liveness_points(costs: list[NodeCost], value=lambda e: e) -> list:
    """Live bytes at every program point: sympy expressions, or numbers when ``value`` evaluates.

    A storage lives from its allocating node to the last node reading it or
    any of its views; outputs live to the end. While a node runs, the storages
    of other nodes that are live then add to the node's own in-node
    allocation points (its workspace, ending with its output).
    """
    position = {c.name: i for i, c in enumerate(costs)}
    root = {}
    for cost in costs:
        root[cost.name] = root.get(cost.alias_of, cost.alias_of) if cost.alias_of else cost.name
    dag = nx.DiGraph()
    dag.add_nodes_from(position)
    dag.add_edges_from((read, c.name) for c in costs for read in c.reads)
    last_use = {c.name: position[c.name] for c in costs}
    for name in dag.nodes:
        owner = root.get(name, name)
        readers = [position[user] for user in dag.successors(name)]
        last_use[owner] = max([last_use[owner], *readers])
    dynamic = [(position[c.name], last_use[c.name], value(c.bytes)) for c in costs
               if not c.static and c.bytes != 0 and root[c.name] == c.name]
    points = []
    for cost in costs:
        if cost.static or cost.role == "output":
            continue
        here = position[cost.name]
        others = sum((b for start, end, b in dynamic if start < here <= end), 0)
        own = cost.workspace or ([cost.bytes] if root[cost.name] == cost.name else [])
        points.extend(others + value(p) for p in own)
    return points


def undominated(exprs: list[sympy.Expr]) -> list[sympy.Expr]:
    """Drop every expression that another one bounds from above for all positive sizes."""
    unique = list(dict.fromkeys(exprs))
    kept = []
    for i, e in enumerate(unique):
        if not any(j != i and _dominates(other, e) and (not _dominates(e, other) or j < i)
                   for j, other in enumerate(unique)):
            kept.append(e)
    return kept


def _dominates(big: sympy.Expr, small: sympy.Expr) -> bool:
    difference = sympy.Poly(sympy.expand(big - small), *sorted(big.free_symbols | small.free_symbols, key=str)) \
        if (big.free_symbols | small.free_symbols) else None
    if difference is None:
        return big >= small
    return all(c >= 0 for c in difference.coeffs())


NODE_MARK = "fxstream-node:"


class _Profile(torch.fx.Interpreter):
    """Runs a graph, recording per node its FLOPs and the peak bytes the allocator gives it."""

    def __init__(self, gm: torch.fx.GraphModule, watched: Collection[str]) -> None:
        super().__init__(gm)
        self.watched = watched
        self.flops: dict[str, int] = {}
        self.points: dict[str, list[int]] = {}

    def run_node(self, n: torch.fx.Node):
        if n.name not in self.watched:
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter, torch.profiler.record_function(NODE_MARK + n.name):
            result = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return result

    def read_allocations(self, prof: torch.profiler.profile) -> None:
        """Each node's running bytes after every allocator event inside its range, over what came before.

        Its in-node peak is their max; the interpolator keeps every event that is the
        peak at some grid size, since which one is can change with size (a constant
        buffer that dominates small sizes, a size-scaled one that dominates large).

        The allocator's events see what tensors alone do not: scratch that kernels
        take and give back (oneDNN's convolution reorders its output from a
        blocked layout, holding as much again), and the exact moment forward-mode
        AD frees its duals.
        """
        memory, ranges = allocator_events(prof)
        times = [t for t, _ in memory]
        running = list(itertools.accumulate(nbytes for _, nbytes in memory))
        for name, start, end in ranges:
            first = bisect.bisect_left(times, start)
            last = bisect.bisect_right(times, end)
            if first < last:
                base = running[first - 1] if first else 0
                self.points[name] = [r - base for r in running[first:last]]


def allocator_events(prof: torch.profiler.profile) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """(time, signed bytes) of every allocation and free, and (node, start, end) of every node's range."""
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    ranges = [(e.name()[len(NODE_MARK):], e.start_ns(), e.start_ns() + e.duration_ns())
              for e in events if e.name().startswith(NODE_MARK)]
    return memory, ranges


def profile(sym: SymbolicCapture, paired: PairedGraph, sizes: Sizes, watched: Collection[str]) -> _Profile:
    """FLOPs and in-node peak bytes of the ``watched`` nodes at concrete (small, grid) sizes.

    Runs on real tensors under torch.profiler with memory events, each node in
    its own ``record_function`` range, after one call outside the profiler, so
    that one-time allocations (cuBLAS's workspace on a GPU) do not count as a
    node's working memory at one grid point and not at the next.
    """
    def make(placeholder, shape):
        like = {"dtype": placeholder.tensor.dtype, "device": placeholder.tensor.device}
        return torch.randn(shape, **like) if torch.is_floating_point(placeholder.tensor) else torch.zeros(shape, **like)

    inputs = sym.graph_inputs(sizes, make)
    with torch.no_grad():
        paired.graph_module(*inputs)  # once untimed: libraries allocate their workspaces on first use
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        prop = _Profile(paired.graph_module, watched)
        prop.run(*inputs)
    prop.read_allocations(prof)
    return prop


def _node_key(node: torch.fx.Node) -> tuple:
    """What determines a node's FLOPs and workspace: its op, its structure and which inputs are uncertain."""
    info = node.meta.get(ROLE, {})
    if info.get("role") == "cov" and node.op == "call_function" and len(node.args) > RULE_STRUCTURE:
        return (info["of"], info["rule"], repr(node.args[RULE_KINDS]), repr(node.args[RULE_KW_KINDS]),
                node.args[RULE_STRUCTURE])
    return (node.name, info.get("role"), info.get("rule"))


BYTES_TOLERANCE_ALLOCATIONS = 4
"""How many allocations' rounding a node's in-node peak may carry (a bound, not a count)."""


def _allocation_granularity(sym: SymbolicCapture) -> int:
    """Bytes the allocator rounds each block to: 512 for the CUDA caching allocator, exact on a CPU."""
    devices = {p.tensor.device.type for p in sym.captured.placeholders if isinstance(p.tensor, torch.Tensor)}
    return 512 if "cuda" in devices else 1


class _LeastSquares:
    """Least-squares fit over the grid in the monomials up to ``degrees`` (exact rational arithmetic)."""

    def __init__(self, grid: list[dict], names: list[str], symbols: list[sympy.Symbol], degrees: tuple) -> None:
        monomials = list(itertools.product(*[range(d + 1) for d in degrees]))
        design = sympy.Matrix([[sympy.Mul(*(point[n] ** e for n, e in zip(names, m))) for m in monomials]
                               for point in grid])
        solve = (design.T * design).inv() * design.T
        self.design = [[Fraction(int(v)) for v in row] for row in design.tolist()]
        self.solve = [[Fraction(int(v.p), int(v.q)) for v in row] for row in solve.tolist()]
        self.terms = [sympy.Mul(*(s**e for s, e in zip(symbols, m))) for m in monomials]

    def within(self, values: list[int], tolerance: int) -> sympy.Expr | None:
        """The fitted polynomial, or None when it misses a grid point by more than ``tolerance``."""
        coefficients = [sum(w * v for w, v in zip(row, values)) for row in self.solve]
        for row, value in zip(self.design, values):
            if abs(sum(a * c for a, c in zip(row, coefficients)) - value) > tolerance:
                return None
        return sympy.expand(sum(sympy.Rational(c.numerator, c.denominator) * t
                                for c, t in zip(coefficients, self.terms)))


class Interpolator:
    """Fits per-node polynomials in the size symbols from profiled runs on a grid, caching by node key.

    Each series is fitted by the lowest-degree polynomial that meets every grid
    point within a tolerance: exactly for FLOPs and for bytes on a CPU, whose
    allocator reports exact sizes; within the allocator's granularity on a GPU,
    where the CUDA caching allocator hands out multiples of 512 bytes. An exact
    cubic through rounded tiny sizes would turn that rounding into a huge cubic
    term at real sizes (GPT-2's diag working memory came out 250x too large).
    """

    def __init__(self, sym: SymbolicCapture, granularity: int | None = None) -> None:
        self.sym = sym
        self.names = list(sym.symbols)
        degrees = [DEGREES.get(n, 3) for n in self.names]
        self.grid = [dict(zip(self.names, p)) for p in itertools.product(*[range(2, d + 3) for d in degrees])]
        self.granularity = granularity if granularity is not None else _allocation_granularity(sym)
        symbols = [sym.symbols[n] for n in self.names]
        candidates = sorted(itertools.product(*[range(d + 1) for d in degrees]), key=lambda c: (sum(c), c))
        self.fits = [_LeastSquares(self.grid, self.names, symbols, c) for c in candidates]
        self.cache: dict[tuple, tuple[sympy.Expr, list[sympy.Expr]]] = {}

    def fit(self, values: list[int], tolerance: int = 0) -> sympy.Expr:
        """The lowest-degree polynomial within ``tolerance`` of ``values`` at every grid point."""
        for candidate in self.fits:
            expr = candidate.within(values, tolerance)
            if expr is not None:
                return expr
        raise AssertionError("the full-degree fit interpolates every grid exactly")

    def fit_bytes(self, values: list[int]) -> sympy.Expr:
        """A byte series, to within the allocator's rounding (a few allocations' worth)."""
        return self.fit(values, BYTES_TOLERANCE_ALLOCATIONS * (self.granularity - 1))

    def fill(self, paired: PairedGraph, costs: list[NodeCost], exact: bool = True) -> bool:
        """Set ``flops`` and ``workspace`` of every node, profiling the graph only for unseen node keys.

        With ``exact=False`` nothing is profiled: unseen nodes keep no FLOPs and
        their output bytes as workspace. Returns whether every node was known.
        """
        nodes = {n.name: n for n in paired.graph_module.graph.nodes}
        keys = {c.name: _node_key(nodes[c.name]) for c in costs if c.name in nodes}
        unseen = {name for name, key in keys.items() if key not in self.cache}
        if unseen and exact:
            runs = [profile(self.sym, paired, point, unseen) for point in self.grid]
            for name in unseen:
                key = keys[name]
                if key in self.cache:  # two nodes of one key: the first fitted
                    continue
                flops = self.fit([run.flops.get(name, 0) for run in runs])
                series = [run.points.get(name, []) for run in runs]
                if len({len(s) for s in series}) == 1 and series[0]:
                    peaks = sorted({max(range(len(s)), key=s.__getitem__) for s in series})
                    points = [self.fit_bytes([s[k] for s in series]) for k in peaks]
                else:
                    points = [self.fit_bytes([max(s, default=0) for s in series])]
                self.cache[key] = (flops, undominated(points))
        for cost in costs:
            if keys.get(cost.name) in self.cache:
                cost.flops, cost.workspace = self.cache[keys[cost.name]]
        return exact or not unseen


def cost_report(sym: SymbolicCapture, paired: PairedGraph, interpolator: Interpolator | None = None,
                exact: bool = True) -> CostReport:
    """Bytes, FLOPs and workspace per node, static bytes and the liveness peak of a paired graph.

    ``exact=False`` uses only workspaces already in the interpolator's cache
    (a quick estimate for ranking candidates); see :meth:`Interpolator.fill`.
    """
    costs = node_costs(sym, paired)
    known = (interpolator or Interpolator(sym)).fill(paired, costs, exact)
    static = sympy.expand(sympy.Add(*(c.bytes for c in costs if c.static)))
    return CostReport(costs, static, sym.symbols, known)
