"""Linear maps with uncertain inputs and/or diagonal weight posteriors: exact moments."""

from __future__ import annotations

import pytest
import torch

from harness import Prepared, Sample, act, capability_problem, cases, check_sample, param, randn

from fxstream.rules import RULES
from fxstream.rules.registry import RuleCall

aten = torch.ops.aten
x = randn(3, 4, seed=1)
tokens = randn(2, 3, 4, seed=2)
w, b = randn(5, 4, seed=3), randn(5, seed=4)
y = randn(2, 4, 5, seed=5)
scores = randn(2, 3, 5, seed=6)  # what baddbmm adds: ALiBi's bias, or a previous layer's scores
alibi = randn(1, 3, 5, seed=7)  # broadcast over the batch
products = randn(4, 3, 5, seed=8)  # the stacked products addbmm sums: x (4, 3, 2) @ y (4, 2, 5)
left, right = randn(4, 3, 2, seed=9), randn(4, 2, 5, seed=10)

SAMPLES = [
    Sample(aten.linear.default, (act(x, 0.5), param(w, 0.5), param(b)), exact=True, monte_carlo=True,
           name="all-uncertain"),
    Sample(aten.linear.default, (x, param(w), param(b)), exact=True, name="weights-only"),
    Sample(aten.linear.default, (act(x), w, b), exact=True, name="input-only"),
    Sample(aten.linear.default, (act(tokens), param(w)), exact=True, name="tokens"),
    Sample(aten.addmm.default, (param(b), act(x), param(w.t())), {"beta": 0.5, "alpha": 2.0},
           exact=True, name="scaled"),
    Sample(aten.addmm.default, (param(b), x, param(w.t())), exact=True, name="weights-only"),
    Sample(aten.mm.default, (act(x), param(w.t())), exact=True),
    Sample(aten.matmul.default, (act(tokens), param(w.t())), exact=True, name="weight"),
    Sample(aten.matmul.default, (act(tokens), act(y)), structures=("diag",), exact=True, name="two-activations"),
    Sample(aten.bmm.default, (act(tokens, 0.5), act(y, 0.5)), structures=("diag",), exact=True, monte_carlo=True),
    Sample(aten.bmm.default, (act(tokens), y), exact=True, name="deterministic-second"),
    Sample(aten.matmul.default, (tokens, act(y)), exact=True, name="deterministic-first"),
    Sample(aten.addmm.default, (act(randn(3, 5, seed=11)), act(x), w.t()), {"beta": 0.5, "alpha": 2.0}, exact=True,
           name="activation-added"),
    Sample(aten.baddbmm.default, (act(scores, 0.5), act(tokens, 0.5), act(y, 0.5)), {"beta": 0.5, "alpha": 2.0},
           structures=("diag",), exact=True, monte_carlo=True),
    Sample(aten.baddbmm.default, (alibi, act(tokens), act(y)), {"alpha": 0.3}, structures=("diag",), exact=True,
           name="deterministic-bias"),
    Sample(aten.baddbmm.default, (param(alibi), act(tokens), y), {"beta": 2.0}, exact=True, name="parameter-bias"),
    Sample(aten.baddbmm.default, (act(scores), tokens, act(y)), {"beta": 0.5, "alpha": 2.0}, exact=True,
           name="one-factor"),
    Sample(aten.addbmm.default, (act(products[0], 0.5), act(left, 0.5), act(right, 0.5)),
           {"beta": 0.5, "alpha": 2.0}, exact=True, monte_carlo=True),
    Sample(aten.addbmm.default, (param(products[0, 0]), left, act(right)), exact=True, name="parameter-bias"),
    Sample(aten.bilinear.default, (act(x), act(randn(3, 2, seed=8)), randn(5, 4, 2, seed=9), param(b)),
           structures=("diag",), exact=True, monte_carlo=True, name="inputs"),
    Sample(aten.bilinear.default, (act(x), randn(3, 2, seed=8), param(randn(5, 4, 2, seed=9))),
           structures=("diag",), exact=True, name="first-input-and-weight"),
    Sample(aten.bilinear.default, (x, act(randn(3, 2, seed=8)), param(randn(5, 4, 2, seed=9)), b),
           structures=("diag",), exact=True, name="second-input-and-weight"),
    Sample(aten.bilinear.default, (act(tokens), tokens, randn(5, 4, 4, seed=10), None), structures=("diag",),
           name="tokens"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


@pytest.mark.parametrize("sample", [Sample(aten.bmm.default, (act(tokens), act(y))),
                                    Sample(aten.baddbmm.default, (scores, act(tokens), act(y)))], ids=lambda s: s.id)
def test_full_covariance_of_two_activations_is_declined(sample: Sample) -> None:
    assert "activation_cov='diag'" in capability_problem(sample, "full")
    assert capability_problem(sample, "diag") is None


def _problem(op, args, kinds, structure="diag"):
    """The capability check on a call whose arguments carry the given kinds (parameter kinds included)."""
    return RULES[op].supports(RuleCall(op, args, {}, kinds, {}, kinds, {}, None, structure))


@pytest.mark.parametrize("op, args, kinds, expected", [
    (aten.linear.default, (x, w), ("diag", "param_dense_affine"), "jointly"),
    (aten.linear.default, (x, w, b), ("diag", None, "param_affine_bias"), "jointly"),
    (aten.linear.default, (x, w, b), ("diag", "param_kfac", "param_kfac"), "bias"),
    (aten.addmm.default, (b, x, w.t()), ("param_affine_bias", "diag", "param_lowrank_affine"), "linear and conv"),
    (aten.matmul.default, (tokens, y), ("diag", "param_kfac"), "2-D weight"),
    (aten.linear.default, (x, w), ("diag", "param_affine_bias"), "cannot be the weight"),
])
def test_posterior_kinds_a_layer_cannot_combine_are_declined(op, args, kinds, expected: str) -> None:
    assert expected in _problem(op, args, kinds)


@pytest.mark.parametrize("op, args, kinds", [
    (aten.linear.default, (x, w, b), ("diag", "param_dense_affine", "param_affine_bias")),
    (aten.linear.default, (x, w, b), ("diag", "param_kfac_eig", "param_lowrank")),
    (aten.addmm.default, (b, x, w.t()), ("param_dense", "diag", "param_kfac")),
    (aten.matmul.default, (tokens, y), ("diag", "param_diag")),
])
def test_posterior_kinds_a_layer_handles_are_accepted(op, args, kinds) -> None:
    assert _problem(op, args, kinds) is None


def test_bfloat16_variance_matmul_stays_within_a_percent_of_exact() -> None:
    """variance_matmul="bfloat16" rounds the variance GEMM operands: close to exact, but really rounded."""
    from fxstream.rules import RULES
    from fxstream.rules.registry import DEFAULT_RULE_OPTIONS

    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(64, 256, generator=g), torch.randn(512, 256, generator=g)
    vh, vw = torch.rand(64, 256, generator=g), torch.rand(512, 256, generator=g)
    target = RULES[aten.linear.default].graph_target
    out = aten.linear.default(h, weight)

    def variance(choice: str) -> torch.Tensor:
        options = {**DEFAULT_RULE_OPTIONS, "variance_matmul": choice}
        return target((h, weight), {}, (vh, vw), {}, ("diag", "param_diag"), {}, out, "diag", options)

    exact = vh @ weight.square().t() + (h.square() + vh) @ vw.t()
    torch.testing.assert_close(variance("exact"), exact, rtol=1e-5, atol=0)
    reduced = variance("bfloat16")
    relative = ((reduced - exact).abs() / exact).max()
    assert 0 < relative < 1e-2


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.op is not aten.bmm.default], ids=lambda s: s.id)
def test_variance_gemms_block_by_block_give_the_same_moments(sample: Sample, monkeypatch) -> None:
    """A large layer's variance GEMMs run a few output rows at a time; the moments must not change."""
    from fxstream.rules import weights

    monkeypatch.setattr(weights, "BLOCKED_ABOVE_ELEMENTS", 0)
    monkeypatch.setattr(weights, "OUTPUT_BLOCK_ELEMENTS", 8)  # 2 rows of a 4-wide weight per block
    check_sample(sample, "diag")


#: layers x @ W (+ b) with an uncertain input: the last layer before an output under output_cov="diag"
DIAGONAL_OUTPUT = [s for s in SAMPLES if s.id in ("aten.linear.default-all-uncertain", "aten.linear.default-input-only",
                                                  "aten.linear.default-tokens", "aten.addmm.default-scaled",
                                                  "aten.mm.default", "aten.matmul.default-weight",
                                                  "aten.addmm.default-activation-added")]


@pytest.mark.parametrize("sample", DIAGONAL_OUTPUT, ids=lambda s: s.id)
@pytest.mark.parametrize("blocked", [False, True])
def test_a_layer_gives_the_variances_of_a_full_input_covariance(sample: Sample, blocked: bool, monkeypatch) -> None:
    """output_cov="diag": fed a full input covariance, the layer returns the diagonal of the exact output
    covariance (jacrev sandwich plus the weight's second-order term), never forming it (whole or by blocks)."""
    from fxstream.rules import weights

    if blocked:
        monkeypatch.setattr(weights, "BLOCKED_ABOVE_ELEMENTS", 0)
        monkeypatch.setattr(weights, "OUTPUT_BLOCK_ELEMENTS", 8)
    prepared = Prepared(sample)
    var = prepared.rule_call("diag", activations="full")
    expected = prepared.oracle("full")[0].diagonal().reshape(prepared.out.shape)
    torch.testing.assert_close(var, expected, rtol=1e-10, atol=1e-14)


def test_variance_gemms_block_by_block_when_traced_for_a_cpu(monkeypatch) -> None:
    """Inductor traces the rule with fake tensors; on a CPU the blocks must survive tracing and stay exact."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxstream.rules import weights
    from fxstream.rules.linear import affine_diag

    monkeypatch.setattr(weights, "BLOCKED_ABOVE_ELEMENTS", 0)
    monkeypatch.setattr(weights, "OUTPUT_BLOCK_ELEMENTS", 8)
    g = torch.Generator().manual_seed(0)
    x, vx, w, vw = (torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g), torch.randn(5, 4, generator=g),
                    torch.rand(5, 4, generator=g))

    def variance(x, vx, w, vw):
        return affine_diag(x, vx, w, ("param_diag", (vw,)))

    traced = make_fx(variance, tracing_mode="fake")(x, vx, w, vw)
    squares = [n for n in traced.graph.nodes if n.target in (aten.square.default, aten.pow.Tensor_Scalar)]
    assert len(squares) == 4  # x once, then the rows 0-1, 2-3, 4 of w
    torch.testing.assert_close(traced(x, vx, w, vw), vx @ w.square().t() + (x.square() + vx) @ vw.t())


@pytest.mark.parametrize("op, has_bias", [(aten.linear.default, True), (aten.linear.default, False),
                                          (aten.addmm.default, True), (aten.mm.default, False),
                                          (aten.matmul.default, False)])
def test_narrowed_affine_computes_exactly_the_columns_asked_for(op, has_bias: bool) -> None:
    """The pruning pass's narrowed layer: the closed-form moments on its columns, NaN (never read) elsewhere."""
    from fxstream.rules.linear import narrowed_affine
    from fxstream.rules.registry import DEFAULT_RULE_OPTIONS

    g = torch.Generator().manual_seed(0)
    h, vh = torch.randn(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g)
    weight, vw = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g)
    bias, vb = torch.randn(6, generator=g), torch.rand(6, generator=g)
    expected = vh @ weight.square().t() + (h.square() + vh) @ vw.t() + (vb if has_bias else 0)
    if op is aten.linear.default:
        args, covs, kinds = (h, weight, bias), (vh, vw, vb), ("diag", "param_diag", "param_diag")
        if not has_bias:
            args, covs, kinds = args[:2], covs[:2], kinds[:2]
    elif op is aten.addmm.default:
        h, vh, expected = h.reshape(6, 4), vh.reshape(6, 4), expected.reshape(6, 6)
        args, covs, kinds = (bias, h, weight.t()), (vb, vh, vw.t()), ("param_diag", "diag", "param_diag")
    else:
        if op is aten.mm.default:
            h, vh, expected = h.reshape(6, 4), vh.reshape(6, 4), expected.reshape(6, 6)
        args, covs, kinds = (h, weight.t()), (vh, vw.t()), ("diag", "param_diag")
    out = op(*args)
    columns = slice(2, 5)
    narrowed = narrowed_affine(args, {}, covs, {}, kinds, {}, out, "diag", DEFAULT_RULE_OPTIONS, None, op, columns)
    torch.testing.assert_close(narrowed[..., columns], expected[..., columns])
    assert narrowed[..., :2].isnan().all() and narrowed[..., 5:].isnan().all()
