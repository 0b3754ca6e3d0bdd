"""Gated products: the covariance of two factors computed from one tensor (option ``gates="linearised"``).

SwiGLU's silu(h W_g^T) * (h W_u^T) and GEGLU's gelu(h W_g^T) * (h W_u^T) multiply
two functions of one tensor h, and the product rule treats its factors a and b
as independent. To first order Cov(a, b) = J_a S_h J_b^T; under diagonal
activations its diagonal is c = diag(J_a diag(v_h) J_b^T), and for Gaussian
factors

    var(a b) = m_b^2 v_a + m_a^2 v_b + 2 m_a m_b c  (+ v_a v_b + c^2 under products="moments").

Where each path from h to a factor is ops acting per element around at most one
linear map (the forms of :mod:`fxstream.rules.residual`: J_a = sum_t diag(a_t)
M_t diag(g_t), J_b = sum_s diag(b_s) N_s diag(h_s)),

    c = sum_{t,s} a_t * b_s * ((g_t h_s v_h) @ (M_t o N_s)^T),

one GEMM of the gate's size per pair of terms, J never formed. h is the
factors' nearest common ancestor (in a transformer MLP the norm's output); the
pair pass uses the term only where h carries a diagonal covariance. Weights
drawn independently for the two maps add nothing to Cov(a, b), so for a SwiGLU
gate with diagonal v_h the term is the exact first-order one
(tests/rules/test_gates.py). Products whose factors reach h through a
reduction or a second map (squeeze-and-excitation: x * sigmoid(W_2 relu(W_1
mean(x)))) or a convolution keep the independent rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from .registry import same_shape
from .residual import ConvChain, Diagonal, Form, NotCarried, ResidualBranch, _branch, _branch_module, _carried, _rows

aten = torch.ops.aten


def _terms(form: Form) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """(a, M, g) per term of J = sum diag(a) M diag(g); M None for the identity (a diagonal J, g ones)."""
    if isinstance(form, Diagonal):
        if not form.exact:
            raise NotCarried("a factor that reaches the fork through two linear maps")
        return [(form.d, None, None)]
    if isinstance(form, ConvChain):
        raise NotCarried("a factor computed by a convolution")
    return list(form.terms.values())


def cross_diagonal(first: Form, second: Form, var: torch.Tensor) -> torch.Tensor:
    """diag(J_a diag(var) J_b^T), (rows, width), for the forms of two factors from one fork; var (rows, n)."""
    total = None
    for a, m, g in _terms(first):
        for b, n, h in _terms(second):
            if m is None and n is None:
                term = var
            elif m is None or n is None:
                square, scale = (n, h) if m is None else (m, g)
                if square.shape[0] != square.shape[1]:
                    raise NotCarried("a factor the width of the fork times one that changes it")
                term = var * square.diagonal() * scale
            else:
                if m.shape != n.shape:
                    raise NotCarried("factors from linear maps of different shapes")
                weight = var if g is None else var * g
                term = (weight if h is None else weight * h) @ (m * n).t()
            for scale in (a, b):
                term = term if scale is None else term * scale
            total = term if total is None else total + term
    return total


class GateProduct(torch.nn.Module):
    """How to evaluate diag(Cov(a, b)) of two factors at the means: their branches from the fork (None:
    the factor is the fork) and the positions of the factors' means in the tuple the join reads."""

    def __init__(self, first: ResidualBranch | None, second: ResidualBranch | None, factors: tuple[int, int]) -> None:
        super().__init__()
        self.first, self.second, self.factors = first, second, factors

    def covariance_diagonal(self, means: tuple, fork_var: torch.Tensor) -> torch.Tensor:
        """diag(J_a diag(v_h) J_b^T) in the first factor's shape; the fork's mean is ``means[0]``."""
        forms = [Diagonal(torch.ones_like(_rows(means[0])), exact=True) if branch is None else branch.form(means)
                 for branch in (self.first, self.second)]
        return cross_diagonal(forms[0], forms[1], _rows(fork_var)).reshape(means[self.factors[0]].shape)


@dataclass
class ProductJoin:
    """A product of two factors computed from ``fork``; ``gate`` evaluates their covariance on the means
    of ``inputs`` (the fork first)."""

    fork: torch.fx.Node
    inputs: list[torch.fx.Node]
    gate: GateProduct


def product_joins(graph: torch.fx.Graph, held: set[torch.fx.Node], norm: str) -> dict[torch.fx.Node, ProductJoin]:
    """Every mul of two same-shape tensors with a common ancestor whose cross term the forms carry.

    The fork is the factors' nearest common ancestor (the latest in graph order).
    Each candidate is evaluated once on meta tensors of its example shapes.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    ancestors: dict[torch.fx.Node, int] = {}  # a bit per node, by graph order
    for node in graph.nodes:
        bits = 1 << order[node]
        for arg in node.all_input_nodes:
            bits |= ancestors[arg]
        ancestors[node] = bits
    nodes = list(graph.nodes)
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
            continue
        first, second = node.args
        if not all(isinstance(f, torch.fx.Node) and isinstance(f.meta.get("val"), torch.Tensor) for f in (first, second)):
            continue
        if not same_shape(first.meta["val"].shape, second.meta["val"].shape) or first is second:
            continue
        common = ancestors[first] & ancestors[second]
        if not common:
            continue
        fork = nodes[common.bit_length() - 1]
        join = _build_product(fork, (first, second), held, norm)
        if isinstance(join, ProductJoin):
            found[node] = join
    return found


def _build_product(fork: torch.fx.Node, factors: tuple[torch.fx.Node, torch.fx.Node], held, norm: str) -> ProductJoin | str:
    """The product join of ``factors`` from ``fork``, or why it cannot be carried."""
    value = fork.meta.get("val")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() == 0:
        return "a fork that is not a floating tensor"
    inputs = [fork]
    branches = []
    for factor in factors:
        if factor is fork:
            branches.append(None)
            continue
        nodes = _branch(fork, factor)
        branch = None if nodes is None else _branch_module(fork, nodes, inputs, held, norm)
        if not isinstance(branch, ResidualBranch):
            return branch or "a factor not computed from the fork"
        branches.append(branch)
    positions = []
    for factor in factors:
        if factor not in inputs:
            inputs.append(factor)
        positions.append(inputs.index(factor))
    if factors[0].meta["val"].numel() // factors[0].meta["val"].shape[-1] != value.numel() // value.shape[-1]:
        return "factors whose rows are not the fork's"
    gate = GateProduct(branches[0], branches[1], (positions[0], positions[1]))
    evaluate = lambda means: gate.covariance_diagonal(means, torch.ones_like(means[0]))  # noqa: E731
    for branch in (b for b in branches if b is not None):
        evaluate = branch.recorded(evaluate)
    problem = _carried(evaluate, inputs)
    return ProductJoin(fork, inputs, gate) if problem is None else problem


def product_covariance(gate: GateProduct, means: tuple, fork_var: torch.Tensor, into: torch.Tensor,
                       second_order: bool) -> torch.Tensor:
    """``into`` (the independent product's variance) plus 2 m_a m_b c, and c^2 when ``second_order``."""
    a, b = (means[i] for i in gate.factors)
    c = gate.covariance_diagonal(means, fork_var).to(into.dtype)
    out = into + 2 * a * b * c
    return out + c.square() if second_order else out


product_covariance.__name__ = product_covariance.__qualname__ = "cov_gated_product"
