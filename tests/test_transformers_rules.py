"""Oracle tests of the transformer rules: attention, layer norm, embedding, the paper-rule patterns.

Every rule is run through its registered graph target, as the rewritten graph
runs it, and compared with torch.func linearisation (jacrev) of the op at the
means: the op itself for the linearised options, the op with the quantities
the paper holds at the mean detached for the paper's options. Monte Carlo
checks the exact product terms of layer norm's affine parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

from fxstream.rules import RULES
from fxstream.rules.attention import attention_probabilities

aten = torch.ops.aten
DTYPE = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=DTYPE)


def variances(*shape: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return scale * (0.5 + torch.rand(*shape, generator=gen(seed), dtype=DTYPE))


def run_rule(op, args, kwargs, covs, kinds, out, structure="diag", **options):
    """Call the rule of ``op`` exactly as the rewritten graph does."""
    chosen = {"attention": "paper", "norm": "paper", **options}
    return RULES[op].graph_target(args, kwargs, covs, {}, kinds, {}, out, structure, chosen)


def diag_oracle(fn, means, variances_):
    """Diagonal of sum_k J_k diag(v_k) J_k^T, J_k from jacrev of ``fn`` at ``means``."""
    out = fn(*means)
    total = torch.zeros(out.numel(), dtype=DTYPE)
    jacobians = jacrev(fn, argnums=tuple(range(len(means))))(*means)
    for j, mean, var in zip(jacobians, means, variances_):
        j = j.reshape(out.numel(), mean.numel())
        total = total + (j.square() * var.reshape(1, -1)).sum(1)
    return total.reshape(out.shape)


def full_oracle(fn, means, covs):
    """Per-sample blocks (B, N, N) of sum_k J_k S_k J_k^T for block-diagonal (per-sample) inputs S_k."""
    out = fn(*means)
    batch, n = out.shape[0], out[0].numel()
    total = torch.zeros(out.numel(), out.numel(), dtype=DTYPE)
    jacobians = jacrev(fn, argnums=tuple(range(len(means))))(*means)
    for j, mean, cov in zip(jacobians, means, covs):
        j = j.reshape(out.numel(), mean.numel())
        total = total + j @ torch.block_diag(*cov.unbind(0)) @ j.T
    return total.reshape(batch, n, batch, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def random_cov(batch: int, n: int, seed: int) -> torch.Tensor:
    a = randn(batch, n, n, seed=seed) / math.sqrt(n)
    return 0.05 * (a @ a.transpose(1, 2) + torch.diag_embed(variances(batch, n, seed=seed + 1)))


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())


# ---------------------------------------------------------------- attention

B, H, T, E = 2, 4, 5, 3


def attention_case(seed: int, heads_kv: int = H):
    q = randn(B, H, T, E, seed=seed)
    k = randn(B, heads_kv, T, E, seed=seed + 1)
    v = randn(B, heads_kv, T, E, seed=seed + 2)
    return q, k, v


MASKS = {
    "none": dict(mask=None, causal=False),
    "causal": dict(mask=None, causal=True),
    "padding-bool": dict(mask=torch.tensor([True, True, True, False, False]).expand(B, 1, T, T), causal=False),
    "additive": dict(mask=randn(B, 1, T, T, seed=9), causal=False),
}


def sdpa(q, k, v, mask, causal, gqa):
    return aten.scaled_dot_product_attention.default(q, k, v, mask, 0.0, causal, scale=0.7, enable_gqa=gqa)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("masking", list(MASKS))
@pytest.mark.parametrize("mode", ["paper", "linearised"])
def test_sdpa_diag_matches_linearisation(mode, masking, gqa):
    """paper: J_v diag(v_v) J_v^T with P at the means; linearised: J diag(v) J^T in q, k and v."""
    q, k, v = attention_case(0, heads_kv=2 if gqa else H)
    mask, causal = MASKS[masking]["mask"], MASKS[masking]["causal"]
    vq, vk, vv = (variances(*t.shape, seed=s) for t, s in ((q, 10), (k, 11), (v, 12)))
    out = sdpa(q, k, v, mask, causal, gqa)
    kwargs = {"scale": 0.7, "enable_gqa": gqa}
    got = run_rule(aten.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, causal), kwargs,
                   (vq, vk, vv, None), ("diag",) * 3 + (None,), out, attention=mode)
    if mode == "paper":
        expected = diag_oracle(lambda v_: sdpa(q, k, v_, mask, causal, gqa), (v,), (vv,))
    else:
        expected = diag_oracle(lambda *t: sdpa(*t, mask, causal, gqa), (q, k, v), (vq, vk, vv))
    close(got, expected)


@pytest.mark.parametrize("mode", ["paper", "linearised"])
def test_sdpa_full_matches_linearisation(mode):
    q, k, v = attention_case(3)
    covs = [random_cov(B, t[0].numel(), seed=20 + i) for i, t in enumerate((q, k, v))]
    out = sdpa(q, k, v, None, True, False)
    got = run_rule(aten.scaled_dot_product_attention.default, (q, k, v, None, 0.0, True), {"scale": 0.7},
                   tuple(covs) + (None,), ("full",) * 3 + (None,), out, "full", attention=mode)
    if mode == "paper":
        expected = full_oracle(lambda v_: sdpa(q, k, v_, None, True, False), (v,), covs[2:])
    else:
        expected = full_oracle(lambda *t: sdpa(*t, None, True, False), (q, k, v), covs)
    close(got, expected)


def test_attention_probabilities_match_sdpa():
    """The rule's P reproduces SDPA's output P V for every mask kind."""
    q, k, v = attention_case(5)
    for spec in MASKS.values():
        p = attention_probabilities(q, k, spec["mask"], spec["causal"], 0.7)
        close(p @ v, sdpa(q, k, v, spec["mask"], spec["causal"], False))


# ---------------------------------------------------------------- layer norm

def layer_norm_fixed_statistics(x, gamma, beta, eps, dims):
    """LayerNorm whose mean and std are constants (computed from the detached input): the paper's rule."""
    reduced = tuple(range(-dims, 0))
    mu = x.detach().mean(reduced, keepdim=True)
    std = (x.detach().var(reduced, unbiased=False, keepdim=True) + eps).sqrt()
    return (x - mu) / std * gamma + beta


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mode", ["paper", "linearised"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_layer_norm_input_matches_linearisation(mode, structure, dims):
    x = randn(2, 3, 4, seed=1) * 2 + 0.5
    shape = list(x.shape[-dims:])
    gamma, beta, eps = randn(*shape, seed=2), randn(*shape, seed=3), 1e-3
    out = torch.nn.functional.layer_norm(x, shape, gamma, beta, eps)
    if mode == "paper":
        fn = lambda x_: layer_norm_fixed_statistics(x_, gamma, beta, eps, dims)  # noqa: E731
    else:
        fn = lambda x_: torch.nn.functional.layer_norm(x_, shape, gamma, beta, eps)  # noqa: E731
    cov = random_cov(2, 12, seed=4) if structure == "full" else variances(*x.shape, seed=4)
    got = run_rule(aten.layer_norm.default, (x, shape, gamma, beta, eps), {}, (cov, None, None, None),
                   (structure, None, None, None), out, structure, norm=mode)
    expected = full_oracle(fn, (x,), (cov,)) if structure == "full" else diag_oracle(fn, (x,), (cov,))
    close(got, expected)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_layer_norm_affine_parameters_are_exact(structure):
    """x, gamma and beta all uncertain, statistics fixed: the output is bilinear in (x, gamma), so the
    moments are exact; 200k-sample Monte Carlo agrees within its noise."""
    x = randn(3, 6, seed=1)
    gamma, beta, eps = randn(6, seed=2), randn(6, seed=3), 1e-5
    vx, vg, vb = variances(3, 6, seed=4), variances(6, seed=5), variances(6, seed=6)
    out = torch.nn.functional.layer_norm(x, [6], gamma, beta, eps)
    cov_x = torch.diag_embed(vx) if structure == "full" else vx
    got = run_rule(aten.layer_norm.default, (x, [6], gamma, beta, eps), {}, (cov_x, None, vg, vb),
                   (structure, None, "param_diag", "param_diag"), out, structure)
    got = got.diagonal(dim1=-2, dim2=-1) if structure == "full" else got
    g = gen(7)
    n = 200_000
    xs = x + vx.sqrt() * torch.randn(n, 3, 6, generator=g, dtype=DTYPE)
    gs = gamma + vg.sqrt() * torch.randn(n, 1, 6, generator=g, dtype=DTYPE)
    bs = beta + vb.sqrt() * torch.randn(n, 1, 6, generator=g, dtype=DTYPE)
    mu, std = x.mean(-1, keepdim=True), (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    mc = ((xs - mu) / std * gs + bs).var(0)
    rel = ((got - mc).abs() / mc).max().item()
    assert rel < 0.03, f"layer norm with uncertain affine parameters is {rel:.1%} from Monte Carlo"


# ---------------------------------------------------------------- embedding

@pytest.mark.parametrize("structure", ["diag", "full"])
def test_embedding_matches_linearisation(structure):
    """Repeated indices read the same weights: the full rule keeps that correlation."""
    weight = randn(7, 3, seed=1)
    indices = torch.tensor([[1, 4, 1, 6], [0, 0, 2, 5]])
    var = variances(7, 3, seed=2)
    out = aten.embedding.default(weight, indices)
    got = run_rule(aten.embedding.default, (weight, indices), {}, (var, None), ("param_diag", None), out, structure)
    fn = lambda w: aten.embedding.default(w, indices)  # noqa: E731
    jac = jacrev(fn)(weight).reshape(out.numel(), weight.numel())
    dense = jac @ torch.diag(var.reshape(-1)) @ jac.T
    if structure == "diag":
        close(got, dense.diagonal().reshape(out.shape))
    else:
        n = out[0].numel()
        close(got, dense.reshape(2, n, 2, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1))
