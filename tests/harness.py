"""A numerical harness that checks any covariance rule against the oracles of method.md.

A :class:`Sample` is one call of an ATen op: its mean arguments, with the
uncertain tensors wrapped in :func:`act` (an activation) or :func:`param` (a
parameter with a diagonal posterior). :func:`check_sample` runs the rule
through its registered graph target, exactly as the rewritten graph does, and
compares it with

- full structure: the per-sample blocks of J S J^T, J from ``torch.func.jacrev``
  of the op at the means, S the joint covariance of all uncertain inputs
  (activations independent across samples, parameters diagonal);
- diag structure: the diagonal of the same oracle with diagonal input covariance;
- parameter structure (a parameter transformed before it meets data): the
  diagonal of J V J^T, whose off-diagonal must vanish (entries stay independent);
- for rules that claim exact moments (``exact=True``: ops bilinear in their
  uncertain arguments), the oracle adds the exact second-order term of every
  pair of uncertain arguments, and (``monte_carlo=True``) Monte Carlo over
  Gaussian inputs with diagonal covariance must agree with the diag rule.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._ops import OpOverload
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxstream.rules import rule_for
from fxstream.rules.registry import DEFAULT_RULE_OPTIONS, RuleCall

DTYPE = torch.float64


@dataclass(frozen=True)
class Uncertain:
    """An uncertain argument: its mean and whether it is an activation or a parameter."""

    mean: torch.Tensor
    role: str  # "act" or "param"
    scale: float


def act(mean: torch.Tensor, scale: float = 0.1) -> Uncertain:
    """An uncertain activation (batch-major); variances of order ``scale``."""
    return Uncertain(mean.to(DTYPE), "act", scale)


def param(mean: torch.Tensor, scale: float = 0.1) -> Uncertain:
    """An uncertain parameter with a diagonal posterior; variances of order ``scale``."""
    return Uncertain(mean.to(DTYPE), "param", scale)


@dataclass
class Sample:
    """One call of ``op`` for the harness.

    ``structures``: activation structures to check (those the rule supports
    for this call). ``exact``: the rule claims exact moments (bilinear op).
    ``monte_carlo``: also compare an exact rule with Monte Carlo (kept to small,
    cheap samples: vmap over sampled weights is slow for convolutions).
    ``reference``: the function the oracles differentiate and sample, when it
    differs from ``op`` (e.g. ``detach``, whose autograd Jacobian is zero but
    whose value is its input).
    """

    op: OpOverload
    args: tuple
    kwargs: dict = field(default_factory=dict)
    structures: tuple[str, ...] = ("diag", "full")
    exact: bool = False
    monte_carlo: bool = False
    name: str = ""
    reference: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        self.args = _to_dtype(self.args)
        self.kwargs = _to_dtype(self.kwargs)

    @property
    def id(self) -> str:
        return f"{self.op}{'-' + self.name if self.name else ''}"


def _to_dtype(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree, is_leaf=lambda x: isinstance(x, Uncertain))
    cast = [x.to(DTYPE) if isinstance(x, torch.Tensor) and torch.is_floating_point(x) else x for x in leaves]
    return tree_unflatten(cast, spec)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal tensor in the harness dtype."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def rand(*shape: int, low: float = 0.5, high: float = 1.5, seed: int = 0) -> torch.Tensor:
    """A seeded uniform tensor in [low, high)."""
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g, dtype=DTYPE)


@dataclass
class Leaf:
    """One uncertain argument with its sampled covariance."""

    path: int  # position among the flattened args/kwargs leaves
    unc: Uncertain
    var: torch.Tensor  # diagonal variances, mean's shape
    cov: torch.Tensor  # per-sample full covariance (B, N, N) for activations; unused for parameters


class Prepared:
    """A sample with its covariances drawn and the op as a function of its uncertain leaves."""

    def __init__(self, sample: Sample, seed: int = 0) -> None:
        self.sample = sample
        is_unc = lambda x: isinstance(x, Uncertain)  # noqa: E731
        self.leaves_all, self.spec = tree_flatten((sample.args, sample.kwargs), is_leaf=is_unc)
        self.leaves: list[Leaf] = []
        for i, value in enumerate(self.leaves_all):
            if isinstance(value, Uncertain):
                var = value.scale * rand(*value.mean.shape, seed=seed + 10 * i + 1)
                cov = random_cov(value.mean, value.scale, seed + 10 * i + 2) if value.role == "act" else var
                self.leaves.append(Leaf(i, value, var, cov))
        self.means = [leaf.unc.mean for leaf in self.leaves]
        self.out = self.fn(*self.means)

    def fn(self, *values: torch.Tensor) -> Any:
        """The op with the uncertain leaves replaced by ``values`` (the rest at their means)."""
        flat = [v.mean if isinstance(v, Uncertain) else v for v in self.leaves_all]
        for leaf, value in zip(self.leaves, values):
            flat[leaf.path] = value
        args, kwargs = tree_unflatten(flat, self.spec)
        return (self.sample.reference or self.sample.op)(*args, **kwargs)

    def outputs(self, out: Any) -> list[torch.Tensor]:
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def rule_call(self, structure: str, options: dict | None = None, activations: str | None = None) -> Any:
        """Run the registered rule through its graph target, as the rewritten graph does; ``activations``:
        the uncertain activations' structure where it is not the output's (output_cov="diag")."""
        activations = activations or structure
        rule = rule_for(self.sample.op)
        by_path = {leaf.path: leaf for leaf in self.leaves}
        flat_cov, flat_kind = [], []
        for i, value in enumerate(self.leaves_all):
            leaf = by_path.get(i)
            if leaf is None:
                flat_cov.append(None)
                flat_kind.append(None)
            elif leaf.unc.role == "param":
                flat_cov.append(leaf.var)
                flat_kind.append("param_diag")
            else:
                flat_cov.append(leaf.cov if activations == "full" else leaf.var)
                flat_kind.append(activations)
        flat_mean = [v.mean if isinstance(v, Uncertain) else v for v in self.leaves_all]
        args, kwargs = tree_unflatten(flat_mean, self.spec)
        covs, kw_covs = tree_unflatten(flat_cov, self.spec)
        kinds, kw_kinds = tree_unflatten(flat_kind, self.spec)
        kw_covs = {k: v for k, v in kw_covs.items() if v is not None}
        kw_kinds = {k: v for k, v in kw_kinds.items() if k in kw_covs}
        options = {**DEFAULT_RULE_OPTIONS, **(options or {})}
        return rule.graph_target(args, kwargs, covs, kw_covs, kinds, kw_kinds, self.out, structure, options)

    def problem(self, structure: str, options: dict | None = None) -> str | None:
        """The rule's capability check on this call, as the pair pass runs it (covs hold the kinds)."""
        rule = rule_for(self.sample.op)
        if rule.supports is None:
            return None
        by_path = {leaf.path: leaf for leaf in self.leaves}
        flat_kind = [None if i not in by_path else "param_diag" if by_path[i].unc.role == "param" else structure
                     for i in range(len(self.leaves_all))]
        flat_mean = [v.mean if isinstance(v, Uncertain) else v for v in self.leaves_all]
        args, kwargs = tree_unflatten(flat_mean, self.spec)
        kinds, kw_kinds = tree_unflatten(flat_kind, self.spec)
        kw_kinds = {k: v for k, v in kw_kinds.items() if v is not None}
        options = {**DEFAULT_RULE_OPTIONS, **(options or {})}
        return rule.supports(RuleCall(self.sample.op, args, kwargs, kinds, kw_kinds, kinds, kw_kinds, self.out,
                                      structure, options))

    def batch(self) -> int:
        acts = [leaf for leaf in self.leaves if leaf.unc.role == "act"]
        return acts[0].unc.mean.shape[0] if acts else self.outputs(self.out)[0].shape[0]

    def input_covariances(self, structure: str) -> list[torch.Tensor]:
        """Dense joint covariance of each uncertain leaf over all its elements."""
        dense = []
        for leaf in self.leaves:
            if leaf.unc.role == "act" and structure == "full":
                dense.append(torch.block_diag(*leaf.cov.unbind(0)))
            else:
                dense.append(torch.diag(leaf.var.reshape(-1)))
        return dense

    def oracle(self, structure: str, second_order: bool = True) -> list[torch.Tensor]:
        """Dense covariance over all elements of each output: J S J^T (+ exact second order)."""
        inputs = self.input_covariances(structure)
        outs = self.outputs(self.out)
        totals = [torch.zeros(o.numel(), o.numel(), dtype=DTYPE) for o in outs]
        # empty outputs (saved statistics) and integer ones (indices) stay zero
        filled = [o for o, out in enumerate(outs) if out.numel() and torch.is_floating_point(out)]
        jacobians = jacrev(lambda *v: tuple(self.outputs(self.fn(*v))[o] for o in filled),
                           argnums=tuple(range(len(self.leaves))))(*self.means)
        for k, (leaf, s) in enumerate(zip(self.leaves, inputs)):
            for j, o in zip(jacobians, filled):
                j = j[k].reshape(outs[o].numel(), leaf.unc.mean.numel())
                totals[o] = totals[o] + j @ s @ j.T
        if self.sample.exact and second_order:
            for a, b in itertools.combinations(range(len(self.leaves)), 2):
                terms = self.second_order(a, b, inputs[a], inputs[b])
                totals = [t + c for t, c in zip(totals, terms)]
        return totals

    def second_order(self, a: int, b: int, sa: torch.Tensor, sb: torch.Tensor) -> list[torch.Tensor]:
        """Cov of the bilinear cross term f(m + u, n + v) - f(m + u, n) - f(m, n + v) + f(m, n).

        With square-root factors u = La e, v = Lb e' this is sum_rs B(La_r, Lb_s) B(La_r, Lb_s)^T,
        exact when f is bilinear in arguments a and b.
        """
        ma, mb = self.means[a], self.means[b]
        la = _sqrt_factor(sa).T.reshape(-1, *ma.shape)
        lb = _sqrt_factor(sb).T.reshape(-1, *mb.shape)

        def cross(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            def at(x, y):
                values = list(self.means)
                values[a], values[b] = x, y
                return self.outputs(self.fn(*values))

            terms = zip(at(ma + u, mb + v), at(ma + u, mb), at(ma, mb + v), at(ma, mb))
            return tuple(p - q - r + s for p, q, r, s in terms)

        both = vmap(vmap(cross, in_dims=(None, 0)), in_dims=(0, None))(la, lb)
        flat = [f.reshape(f.shape[0] * f.shape[1], f[0, 0].numel()) for f in both]
        return [f.T @ f for f in flat]

    def monte_carlo(self, structure: str, samples: int, seed: int = 0) -> list[torch.Tensor]:
        """Empirical output variances under Gaussian inputs with the sample's covariances."""
        g = torch.Generator().manual_seed(seed)
        factors = [_sqrt_factor(s) for s in self.input_covariances(structure)]
        total = [torch.zeros_like(o) for o in self.outputs(self.out)]
        square = [torch.zeros_like(o) for o in self.outputs(self.out)]
        chunk = 2000
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            draws = [
                m + (torch.randn(n, f.shape[1], generator=g, dtype=DTYPE) @ f.T).reshape(n, *m.shape)
                for m, f in zip(self.means, factors)
            ]
            outs = vmap(lambda *v: tuple(self.outputs(self.fn(*v))))(*draws)
            for o, y in enumerate(outs):
                total[o] = total[o] + y.sum(0)
                square[o] = square[o] + y.square().sum(0)
        return [sq / samples - (t / samples).square() for t, sq in zip(total, square)]


def node_values(graph_module: torch.fx.GraphModule, *args) -> dict:
    """Every node's value when ``graph_module`` runs on ``args``."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Recorder(graph_module).run(*args)
    return values


def random_cov(mean: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """A random SPD per-sample covariance (B, N, N) with diagonal of order ``scale``."""
    batch, n = mean.shape[0], mean[0].numel()
    a = randn(batch, n, n, seed=seed) / n**0.5
    return scale * (0.5 * a @ a.transpose(1, 2) + torch.diag_embed(rand(batch, n, seed=seed + 1)))


def _sqrt_factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = cov: the square root of a diagonal covariance, else its Cholesky factor."""
    if torch.count_nonzero(cov - torch.diag(cov.diagonal())) == 0:
        return torch.diag(cov.diagonal().sqrt())
    return torch.linalg.cholesky(cov)


def per_sample_blocks(dense: torch.Tensor, batch: int) -> torch.Tensor:
    """The (B, N, N) diagonal blocks of a (B N, B N) covariance."""
    n = dense.shape[0] // batch
    return dense.reshape(batch, n, batch, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    rtol = 1e-7 if actual.dtype == torch.float64 else 1e-5
    atol = rtol * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.to(DTYPE), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_sample(sample: Sample, structure: str, mc_samples: int = 20_000, options: dict | None = None) -> None:
    """Assert that the rule of ``sample.op`` matches the oracles for ``structure``.

    ``options`` are rule options; with ``products="linearised"`` the oracle is first order throughout.
    """
    second_order = (options or {}).get("products", "moments") == "moments"
    prepared = Prepared(sample)
    problem = prepared.problem(structure, options)
    assert problem is None, f"{sample.id} [{structure}]: the rule declines this call: {problem}"
    if structure == "param_diag":
        assert rule_for(sample.op).param_passthrough, f"{sample.id}: the rule is not registered as a passthrough"
        assert all(leaf.unc.role == "param" for leaf in prepared.leaves), f"{sample.id}: not parameters only"
    outs = prepared.outputs(prepared.out)
    actual = prepared.outputs(prepared.rule_call(structure, options))
    expected = prepared.oracle("full" if structure == "full" else "diag", second_order)
    assert len(actual) == len(outs), f"{sample.id}: rule returned {len(actual)} covariances for {len(outs)} outputs"
    for o, (got, dense, out) in enumerate(zip(actual, expected, outs)):
        what = f"{sample.id} [{structure}] output {o}"
        if got is None:  # the rule says this output carries no uncertainty
            assert not dense.any(), f"{what}: the rule returned no covariance for an uncertain output"
            continue
        if structure == "full":
            _close(got, per_sample_blocks(dense, prepared.batch()), what)
            variances = got.diagonal(dim1=-2, dim2=-1).reshape(out.shape)
        else:
            assert got.shape == out.shape, f"{what}: variance shape {tuple(got.shape)} != {tuple(out.shape)}"
            _close(got, dense.diagonal().reshape(out.shape), what)
            variances = got
        if structure == "param_diag":
            off = dense - torch.diag(dense.diagonal())
            assert off.abs().max() <= 1e-12 * dense.abs().max(), f"{what}: entries become correlated"
        if sample.monte_carlo and structure == "diag" and second_order:
            assert sample.exact, f"{sample.id}: Monte Carlo checks only rules that claim exact moments"
            mc = prepared.monte_carlo("diag", mc_samples)[o]
            rel = ((variances - mc).abs() / mc.clamp_min(1e-12)).max().item()
            assert rel < 0.08, f"{what}: exact-moment rule is {rel:.1%} from {mc_samples}-sample Monte Carlo"


def capability_problem(sample: Sample, structure: str = "diag", options: dict | None = None) -> str | None:
    """Why the rule of ``sample.op`` declines this call (its ``supports`` check), or None."""
    return Prepared(sample).problem(structure, options)


def structures_to_check(sample: Sample) -> list[str]:
    """The sample's structures that the rule registers ("param_diag": a parameter passthrough).

    A sample that would check nothing is an error, so it cannot count as a rule's test.
    """
    rule = rule_for(sample.op)
    wanted = [s for s in sample.structures if s in rule.structures or s == "param_diag"]
    if not wanted:
        raise ValueError(f"{sample.id}: the rule supports {rule.structures}, the sample asks for {sample.structures}")
    return wanted


def sample_tables(folder: Path, skip: str | None = None) -> dict[str, list[Sample]]:
    """SAMPLES of every test_<family>.py module in ``folder`` but ``skip`` (a caller's own file)."""
    tables = {}
    for path in sorted(folder.glob("test_*.py")):
        if skip is not None and path.resolve() == Path(skip).resolve():
            continue
        spec = importlib.util.spec_from_file_location(f"sample_table_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "SAMPLES"):
            tables[path.stem] = module.SAMPLES
    return tables


def cases(samples: Iterable[Sample]) -> list[Any]:
    """pytest params (sample, structure) with readable ids."""
    import pytest

    return [pytest.param(s, st, id=f"{s.id}-{st}") for s in samples for st in structures_to_check(s)]

