"""Property-based tests: random small networks built from the rule table, checked against the oracles.

Hypothesis draws a network (a vector or an image chain: linear maps and
convolutions, norms, pooling, and elementwise or shape-preserving ops taken
from the harness's sample tables in tests/rules/, so a rule added there joins
the search), its sizes, which layers are Bayesian and each layer's posterior
structure (Diagonal, KFAC, Dense, LowRank, mixed). Oracles (method.md):

- ``products="linearised"``, ``norm="linearised"``, ``activation_cov="full"``,
  a branch-free chain: the predictive is exactly J Sigma J^T, J from
  ``torch.func.jacrev`` in float64, Sigma the posterior's covariance blocks;
- either activation structure, only the last layer Bayesian: J Sigma J^T for
  both ``products`` settings (the network is linear in that layer);
- default rules (``products="moments"``), full activations, a chain of affine
  maps with every layer Bayesian: the moments are exact, so Monte Carlo over
  the same posterior agrees within a bound from its standard error.

CI runs a fixed, derandomised set of examples (profile "ci" in conftest.py, a
few seconds). A longer random search:
``python -m pytest tests/test_properties.py --hypothesis-profile=long``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_flatten

from harness import Uncertain, per_sample_blocks, sample_tables

import fxstream
from fxstream.rules import rule_for

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPE = torch.float64


# ------------------------------------------------------------------ the op vocabulary, from the sample tables


@dataclass(frozen=True)
class UnaryOp:
    """A sampled call of a shape-preserving op with one uncertain activation: ``op(x, *args, **kwargs)``.

    ``domain`` is where the sample's mean lies ("real", "positive", "unit": (0, 1)); the chain maps its
    activation there first (softplus + 0.5, or a squashed sigmoid), so log, rsqrt, logit, ... stay defined.
    """

    name: str
    op: Any
    args: tuple
    kwargs: tuple
    domain: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.domain == "positive":
            x = nn.functional.softplus(x) + 0.5
        elif self.domain == "unit":
            x = 0.1 + 0.8 * torch.sigmoid(x)
        return self.op(x, *self.args, **dict(self.kwargs))

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        """Whether the call is defined at this activation shape (dims, groups) and keeps it."""
        try:
            out = self(torch.zeros(shape, dtype=DTYPE) + 0.3)
        except (RuntimeError, IndexError, ValueError):
            return False
        return isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape)


def _unary_ops() -> list[UnaryOp]:
    """Every sample whose only uncertain argument is its first, an activation, with no other tensor
    (nor dtype or device) argument, that keeps its input's shape and whose rule has both structures."""
    ops = []
    for samples in sample_tables(Path(__file__).parent / "rules").values():
        for sample in samples:
            leaves, _ = tree_flatten((sample.args, sample.kwargs), is_leaf=lambda x: isinstance(x, Uncertain))
            uncertain = [leaf for leaf in leaves if isinstance(leaf, Uncertain)]
            if (len(uncertain) != 1 or not isinstance(sample.args[0], Uncertain) or uncertain[0].role != "act"
                    or sample.reference is not None or "full" not in sample.structures
                    or "full" not in rule_for(sample.op).structures):
                continue
            if any(isinstance(leaf, (torch.Tensor, torch.dtype, torch.device, torch.memory_format))
                   for leaf in leaves[1:]):
                continue
            mean = sample.args[0].mean
            domain = "real" if mean.min() <= 0 else "unit" if mean.max() < 1 else "positive"
            op = UnaryOp(sample.id, sample.op, tuple(sample.args[1:]), tuple(sorted(sample.kwargs.items())), domain)
            if op.applies_to(tuple(mean.shape)):
                ops.append(op)
    return ops


UNARY = _unary_ops()


def test_the_vocabulary_draws_from_every_family_of_shape_preserving_rules() -> None:
    families = {rule_for(op.op).family for op in UNARY}
    assert {"activation", "arithmetic", "softmax", "shape", "pointwise"} <= families
    assert len(UNARY) >= 40


# ------------------------------------------------------------------ random networks


class Chain(nn.Module):
    """Layers applied in order; a layer is a module or a :class:`UnaryOp`."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__()
        self.steps = list(layers)
        self.layers = nn.ModuleList(layer for layer in layers if isinstance(layer, nn.Module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


def _unaries(draw, shape: tuple[int, ...], most: int) -> list[UnaryOp]:
    usable = [op for op in UNARY if op.applies_to(shape)]
    return [draw(st.sampled_from(usable)) for _ in range(draw(st.integers(0, most)))]


@st.composite
def networks(draw, affine_only: bool = False) -> tuple[Chain, torch.Tensor, list[str]]:
    """A random branch-free network in float64, its input, and the names of its mixing layers (Linear/Conv).

    ``affine_only`` leaves out every nonlinear op: linear maps, convolutions, average pooling, eval
    batch norm, flatten and scalar arithmetic only.
    """
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, 3))
    layers: list[Any] = []
    affine = [op for op in UNARY if rule_for(op.op).family == "arithmetic"]
    pick = (lambda shape, most: [draw(st.sampled_from(affine)) for _ in range(draw(st.integers(0, most)))]) \
        if affine_only else (lambda shape, most: _unaries(draw, shape, most))
    if draw(st.sampled_from(["vector", "image"])) == "image":
        channels, size = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6]))
        x = torch.randn(batch, channels, size, size, generator=g, dtype=DTYPE)
        for _ in range(draw(st.integers(1, 2))):
            out, kernel = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
            layers.append(nn.Conv2d(channels, out, kernel, padding=kernel // 2, bias=draw(st.booleans())))
            channels = out
            if draw(st.booleans()):
                norm = nn.BatchNorm2d(channels)
                norm.running_mean.normal_(0, 0.3, generator=g)
                norm.running_var.uniform_(0.5, 2.0, generator=g)
                layers.append(norm)
            layers += pick((batch, channels, size, size), 2)
            if size % 2 == 0 and size > 2 and draw(st.booleans()):
                layers.append(nn.AvgPool2d(2) if affine_only or draw(st.booleans()) else nn.MaxPool2d(2))
                size //= 2
        layers.append(nn.Flatten())
        width = channels * size * size
    else:
        width = draw(st.integers(2, 5))
        x = torch.randn(batch, width, generator=g, dtype=DTYPE)
    for _ in range(draw(st.integers(0 if layers else 1, 2))):
        out = draw(st.integers(2, 5))
        layers.append(nn.Linear(width, out))
        width = out
        if not affine_only and draw(st.booleans()):
            layers.append(nn.LayerNorm(width) if draw(st.booleans()) else nn.RMSNorm(width))
        layers += pick((batch, width), 2)
    layers.append(nn.Linear(width, draw(st.integers(1, 3))))
    model = Chain(layers).to(DTYPE).eval()
    with torch.no_grad():  # affine parameters of the norms away from (1, 0), so they matter
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.RMSNorm)):
                module.weight.uniform_(0.5, 1.5, generator=g)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0, 0.2, generator=g)
    mixing = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    return model, x, mixing


# ------------------------------------------------------------------ random posteriors and their covariance


def _spd(n: int, scale: float, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=DTYPE) / n**0.5
    return scale * (a @ a.T + 0.5 * torch.eye(n, dtype=DTYPE))


def _variance(shape: torch.Size, scale: float, g: torch.Generator) -> torch.Tensor:
    return scale * (0.5 + torch.rand(shape, generator=g, dtype=DTYPE))


Blocks = list[tuple[tuple[str, ...], torch.Tensor]]


def _layer_posterior(kind: str, prefix: str, params: dict[str, torch.Tensor], scale: float,
                     g: torch.Generator) -> tuple[fxstream.Posterior, Blocks]:
    """One layer's posterior of structure ``kind`` and its dense covariance blocks over vec(weight), bias."""
    names = [n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in params]
    weight = params[names[0]]
    sizes = [params[n].numel() for n in names]
    if kind == "diag" or weight.dim() < 2:
        variances = {n: _variance(params[n].shape, scale, g) for n in names}
        return fxstream.Diagonal(variances), [((n,), torch.diag(v.reshape(-1))) for n, v in variances.items()]
    if kind == "kfac":
        out_factor, in_factor = _spd(weight.shape[0], scale**0.5, g), _spd(sizes[0] // weight.shape[0], scale**0.5, g)
        factors = {names[0]: (out_factor, in_factor)}
        blocks = [((names[0],), torch.kron(out_factor, in_factor))]
        if len(names) == 2:
            factors[names[1]] = (_spd(sizes[1], scale, g),)
            blocks.append(((names[1],), factors[names[1]][0]))
        return fxstream.KFAC(factors, shapes={names[0]: weight.shape}), blocks
    if kind == "dense":
        cov = _spd(sum(sizes), scale, g)
        return fxstream.Dense({tuple(names) if len(names) == 2 else names[0]: cov},
                              {n: params[n].shape for n in names}), [(tuple(names), cov)]
    rank = 2
    diagonal = {n: _variance(params[n].shape, scale, g) for n in names}
    factors = {n: (scale / rank) ** 0.5 * torch.randn(rank, *params[n].shape, generator=g, dtype=DTYPE)
               for n in names}
    u = torch.cat([factors[n].reshape(rank, -1) for n in names], dim=1)
    cov = torch.diag(torch.cat([diagonal[n].reshape(-1) for n in names])) + u.T @ u
    return fxstream.LowRank(diagonal, factors), [(tuple(names), cov)]


@st.composite
def posteriors(draw, model: nn.Module, layers: list[str]) -> tuple[fxstream.Posterior, Blocks]:
    """A posterior over the parameters of ``layers``, each layer's structure drawn; Mixed when they differ."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-3, 1e-2, 0.1]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    parts, blocks = [], []
    for layer in layers:
        kind = draw(st.sampled_from(["diag", "kfac", "dense", "lowrank"]))
        part, part_blocks = _layer_posterior(kind, layer, params, scale, g)
        parts.append(part)
        blocks += part_blocks
    return (parts[0] if len(parts) == 1 else fxstream.Mixed(*parts)), blocks


def _owners(model: nn.Module) -> list[str]:
    """Every module owning parameters directly, in order."""
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def parameter_oracle(model: nn.Module, blocks: Blocks, x: torch.Tensor) -> torch.Tensor:
    """Per-sample J Sigma J^T over the blocks' parameters, J = d f(x) / d theta by jacrev."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = [n for names, _ in blocks for n in names]

    def f(chosen):
        return functional_call(model, {**params, **chosen}, (x,)).reshape(-1)

    jac = jacrev(f)({n: params[n] for n in wanted})
    total = 0
    for names, cov in blocks:
        j = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)
        total = total + j @ cov @ j.T
    return per_sample_blocks(total, x.shape[0])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ properties


@given(data=st.data())
def test_linearised_full_predictive_equals_the_parameter_jacobian_oracle(data: st.DataObject) -> None:
    """Random chain, random Bayesian layers in random structures: exactly J Sigma J^T (GLM)."""
    model, x, mixing = data.draw(networks())
    owners = _owners(model)
    chosen = data.draw(st.lists(st.sampled_from(owners), min_size=1, unique=True))
    layers = [o for o in owners if o in chosen]  # in model order
    posterior, blocks = data.draw(posteriors(model, layers))
    pred = fxstream.streamline(model, posterior, activation_cov="full", products="linearised", norm="linearised",
                               backend="eager")(x)
    expected = parameter_oracle(model, blocks, x)
    assert_close(pred.mean, model(x), "mean")
    assert_close(pred.cov, expected, f"covariance of {model}")
    assert_close(pred.var, expected.diagonal(dim1=1, dim2=2), "variance")


@given(data=st.data(), structure=st.sampled_from(["diag", "full"]), products=st.sampled_from(["moments", "linearised"]))
def test_a_bayesian_last_layer_gives_the_oracle_under_both_structures(data: st.DataObject, structure: str,
                                                                      products: str) -> None:
    """Only the last layer uncertain (any structure): the output is linear in it, so every rule setting is exact."""
    model, x, mixing = data.draw(networks())
    posterior, blocks = data.draw(posteriors(model, mixing[-1:]))
    pred = fxstream.streamline(model, posterior, activation_cov=structure, products=products, backend="eager")(x)
    expected = parameter_oracle(model, blocks, x)
    assert_close(pred.mean, model(x), "mean")
    assert_close(pred.var, expected.diagonal(dim1=1, dim2=2), f"variance of {model}")
    if structure == "full":
        assert_close(pred.cov, expected, "covariance")
    else:
        assert pred.cov is None


def _monte_carlo(model: nn.Module, blocks: Blocks, x: torch.Tensor, samples: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output variances under parameters drawn from the blocks' Gaussians, and their standard errors."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters()}
    drawn = {}
    for names, cov in blocks:
        flat = torch.cat([params[n].reshape(-1) for n in names])
        noise = torch.randn(samples, flat.numel(), generator=g, dtype=DTYPE) @ torch.linalg.cholesky(cov).T
        for n, part in zip(names, (flat + noise).split([params[n].numel() for n in names], dim=1)):
            drawn[n] = part.reshape(samples, *params[n].shape)
    out = vmap(lambda d: functional_call(model, {**params, **d}, (x,)))(drawn)
    centred = out - out.mean(0)
    var = centred.square().mean(0)
    fourth = centred.pow(4).mean(0)
    return var, ((fourth - var.square()).clamp_min(0) / samples).sqrt()


@given(data=st.data())
def test_default_rules_on_affine_chains_match_monte_carlo(data: st.DataObject) -> None:
    """products="moments", full activations, every layer Bayesian, only affine maps: exact first two moments,
    so each output variance lies within 5 standard errors of a 20000-sample Monte Carlo estimate."""
    model, x, _ = data.draw(networks(affine_only=True))
    posterior, blocks = data.draw(posteriors(model, _owners(model)))
    pred = fxstream.streamline(model, posterior, activation_cov="full", backend="eager")(x)
    mc, error = _monte_carlo(model, blocks, x, 20_000, seed=data.draw(st.integers(0, 2**16)))
    assert_close(pred.mean, model(x), "mean")
    bound = 5 * error + 1e-12 * mc.abs().max()
    worst = ((pred.var - mc).abs() / bound).max().item()
    assert worst <= 1, f"variance {worst:.2f} x (5 standard errors) from Monte Carlo for {model}"
