"""Residual joins (h + f(h)): the branch's Jacobian diagonal against jacrev, and the predictive against
the exact linearisation where diagonal activations lose nothing else."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxstream
from fxstream.rules import mean_only_nodes
from fxstream.rules.residual import residual_joins
from harness import DTYPE, node_values, rand, randn

D, K = 4, 6


def layer_norm(x):
    return F.layer_norm(x, (D,))


def rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def gelu_mlp(h, w1, w2, norm=layer_norm):
    """A BERT/ViT-style MLP branch: layer norm, linear, gelu, linear."""
    return F.linear(F.gelu(F.linear(norm(h), w1)), w2)


def conv1d_mlp(h, w1, w2, norm=layer_norm):
    """GPT-2's Conv1D layers: addmm on flattened rows, viewed back; a tanh-gelu written out."""
    hidden = torch.addmm(torch.zeros(K, dtype=h.dtype), norm(h).reshape(-1, D), w1.t()).reshape(*h.shape[:-1], K)
    hidden = 0.5 * hidden * (1 + torch.tanh(0.8 * (hidden + 0.044715 * hidden**3)))
    return torch.mm(hidden.reshape(-1, K), w2.t()).reshape(h.shape)


def swiglu(h, w1, w2, w3, norm=rms_norm):
    """Llama's MLP branch: RMS norm written out, silu(x W1) * (x W3), then W2."""
    x = norm(h)
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def one_map(h, w1, w2, norm=torch.tanh):
    """A branch with one square linear map."""
    return F.linear(norm(h), w2 @ w1)


BRANCHES = [gelu_mlp, conv1d_mlp, swiglu, one_map]


def _weights(branch):
    shapes = [(K, D), (D, K), (K, D)] if branch is swiglu else [(K, D), (D, K)]
    return [randn(*s) for s in shapes]


def _held(norm, h):
    """``norm`` with its statistics held at their values for h (the paper's norm rule)."""
    if norm is layer_norm:
        mu, rstd = h.mean(-1, keepdim=True), torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return lambda x: (x - mu) * rstd
    if norm is rms_norm:
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return lambda x: x * rstd
    return norm


def _jacobian_diagonal(branch, h, weights):
    norm = _held(inspect.signature(branch).parameters["norm"].default, h)
    jacobian = torch.func.jacrev(lambda x: branch(x, *weights, norm=norm))(h)
    return jacobian.reshape(h.numel(), h.numel()).diagonal().reshape(h.shape)


@pytest.mark.parametrize("branch", BRANCHES, ids=lambda f: f.__name__)
def test_branch_jacobian_diagonal_equals_jacrev(branch) -> None:
    h, weights = 2 * randn(2, 3, D), _weights(branch)
    block = make_fx(lambda h, *w: h + branch(h, *w), pre_dispatch=True)(h, *weights)  # ops as Dynamo gives them
    held = mean_only_nodes(block.graph, {"norm": "paper", "attention": "paper"})
    joins = residual_joins(block.graph, held, "paper")
    output = next(iter(block.graph.find_nodes(op="output"))).args[0]
    join = joins.get(output)
    assert join is not None, "the residual join was not recognised"
    values = node_values(block, h, *weights)
    got = join.branch.diagonal(tuple(values[n] for n in join.inputs)).reshape(h.shape)
    torch.testing.assert_close(got, _jacobian_diagonal(branch, h, weights))


def test_branches_it_cannot_carry_keep_the_independent_add() -> None:
    """A third linear map, and token mixing (attention), leave diag(J_f) out of reach: no join."""
    w = randn(D, D)

    def three_maps(h):
        return h + F.linear(torch.tanh(F.linear(torch.tanh(F.linear(h, w)), w)), w)

    def mixing(h):
        return h + torch.softmax(h @ h.transpose(-1, -2), -1) @ F.linear(h, w)

    for block in (three_maps, mixing):
        graph = make_fx(block, pre_dispatch=True)(randn(2, 3, D)).graph
        assert residual_joins(graph, set(), "paper") == {}, block.__name__


class _ResidualBlock(torch.nn.Module):
    """h + W2 tanh(W1 h), W1 a scaled permutation: every hidden unit reads its own input feature, so
    diagonal activations lose nothing inside the branch and only the skip/branch covariance is at stake."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.eye(D, dtype=DTYPE)[torch.randperm(D)] * 1.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(randn(D, D), requires_grad=False)

    def forward(self, h):
        return h + F.linear(torch.tanh(F.linear(h, self.w1)), self.w2)


def test_linearised_residual_equals_the_linearised_predictive() -> None:
    torch.manual_seed(0)
    model = _ResidualBlock().eval()
    h, variance = randn(5, D), 1e-4 * (1 + torch.rand(5, D, dtype=DTYPE))
    jacobians = torch.func.vmap(torch.func.jacrev(model))(h)
    expected = torch.einsum("bij,bj,bij->bi", jacobians, variance, jacobians)
    got = fxstream.streamline(model, input_var=variance, residual="linearised", backend="eager")(h).var
    torch.testing.assert_close(got, expected)
    independent = fxstream.streamline(model, input_var=variance, backend="eager")(h).var
    assert not torch.allclose(independent, expected, rtol=1e-2)


# Convolutional branches. A geometry: (first kernel, padding, dilation, groups), then the second's.
C, HIDDEN = 4, 6
GEOMETRIES = {
    "basic_3x3": ((3, 1, 1, 1), (3, 1, 1, 1)),
    "1x1_then_3x3": ((1, 0, 1, 1), (3, 1, 1, 1)),
    "3x3_then_1x1": ((3, 1, 1, 1), (1, 0, 1, 1)),
    "5x5_then_3x3": ((5, 2, 1, 1), (3, 1, 1, 1)),
    "valid_then_full": ((3, 0, 1, 1), (3, 2, 1, 1)),
    "dilated": ((3, 2, 2, 1), (3, 1, 1, 1)),
    "grouped": ((3, 1, 1, 2), (3, 1, 1, 2)),
    "depthwise_then_dense": ((3, 1, 1, C), (1, 0, 1, 1)),
    "same_string": ((3, "same", 1, 1), (5, "same", 1, 1)),
}


def _batch_norm_stats(channels: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Running mean, running variance, gamma, beta, away from their defaults."""
    return randn(channels, seed=seed), rand(channels, seed=seed + 1), rand(channels, seed=seed + 2), \
        randn(channels, seed=seed + 3)


def conv_branch(geometry, spatial: int = 2):
    """conv -> batch norm -> relu -> conv -> batch norm, the torchvision BasicBlock branch, with weights."""
    (k1, p1, d1, g1), (k2, p2, d2, g2) = geometry
    hidden = C if g1 == C else HIDDEN
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    w1 = 0.5 * randn(hidden, C // g1, *[k1] * spatial, seed=1)
    w2 = 0.5 * randn(C, hidden // g2, *[k2] * spatial, seed=2)
    bias = randn(hidden, seed=3)
    bn1, bn2 = _batch_norm_stats(hidden, 10), _batch_norm_stats(C, 20)

    def branch(h):
        x = conv(h, w1, bias, 1, p1, d1, g1)
        x = torch.relu(F.batch_norm(x, bn1[0], bn1[1], bn1[2], bn1[3], training=False))
        x = conv(x, w2, None, 1, p2, d2, g2)
        return F.batch_norm(x, bn2[0], bn2[1], bn2[2], bn2[3], training=False)

    return branch


def _join(block, h):
    """The residual join of ``block``'s output and diag(J_f) there, evaluated on ``h``."""
    graph_module = make_fx(block, pre_dispatch=True)(h)
    joins = residual_joins(graph_module.graph, mean_only_nodes(graph_module.graph, {"norm": "paper"}), "paper")
    output = next(iter(graph_module.graph.find_nodes(op="output"))).args[0]
    join = joins.get(output)
    assert join is not None, "the residual join was not recognised"
    values = node_values(graph_module, h)
    return join.branch.diagonal(tuple(values[n] for n in join.inputs)).reshape(h.shape)


def _jacrev_diagonal(function, h):
    return torch.func.jacrev(function)(h).reshape(h.numel(), h.numel()).diagonal().reshape(h.shape)


@pytest.mark.parametrize("geometry", list(GEOMETRIES), ids=str)
def test_conv_branch_jacobian_diagonal_equals_jacrev(geometry) -> None:
    branch = conv_branch(GEOMETRIES[geometry])
    h = 2 * randn(2, C, 5, 6, seed=4)
    torch.testing.assert_close(_join(lambda x: x + branch(x), h), _jacrev_diagonal(branch, h))


@pytest.mark.parametrize("spatial", [1, 3])
def test_conv1d_and_conv3d_branches(spatial: int) -> None:
    branch = conv_branch(GEOMETRIES["basic_3x3"], spatial)
    h = randn(2, C, *[4] * spatial, seed=5)
    torch.testing.assert_close(_join(lambda x: x + branch(x), h), _jacrev_diagonal(branch, h))


def test_one_convolution_branch() -> None:
    """h + bn(conv(tanh h)): a single square convolution, whose diagonal is its centre tap."""
    w, bn = randn(C, C, 3, 3, seed=6), _batch_norm_stats(C, 30)

    def branch(h):
        return F.batch_norm(F.conv2d(torch.tanh(h), w, None, 1, 1), bn[0], bn[1], bn[2], bn[3], training=False)

    h = randn(2, C, 4, 4, seed=7)
    torch.testing.assert_close(_join(lambda x: x - branch(x), h), _jacrev_diagonal(branch, h))


def _captured(model: torch.nn.Module, x: torch.Tensor, **options):
    """The captured graph of ``model`` as fxstream sees it (functionalised: eval batch norm is
    _native_batch_norm_legit_no_training), with its placeholders' values, and the warnings raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamlined = fxstream.streamline(model, input_var=1e-3, backend="eager", **options)
        streamlined(x)
    return streamlined.graphs[0].captured, [str(w.message) for w in caught if "residual=" in str(w.message)]


def _torchvision_blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return BasicBlock, Bottleneck


def _randomised(block: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return block.to(DTYPE).eval()


def test_torchvision_basic_block_as_captured() -> None:
    """The captured BasicBlock (functional batch norm, getitem, in-place relu as relu): diag(J_f) = jacrev's."""
    basic_block, _ = _torchvision_blocks()
    block = _randomised(basic_block(C, C))
    x = randn(2, C, 5, 5, seed=8)
    captured, caught = _captured(block, x, residual="linearised")
    assert caught == []
    graph = captured.graph_module.graph
    joins = residual_joins(graph, mean_only_nodes(graph, {"norm": "paper"}), "paper")
    assert len(joins) == 1
    join = next(iter(joins.values()))
    values = node_values(captured.graph_module, *captured.example_inputs)
    got = join.branch.diagonal(tuple(values[n] for n in join.inputs)).reshape(x.shape)

    def branch(h):
        return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))

    torch.testing.assert_close(got, _jacrev_diagonal(branch, x))


def test_bottleneck_and_downsampling_joins_warn_once() -> None:
    """A bottleneck has three convolutions and a downsampling block maps both paths: the forms carry
    neither, and one warning says how many joins were left and why."""
    basic_block, bottleneck = _torchvision_blocks()
    model = torch.nn.Sequential(
        basic_block(C, 2 * C, downsample=torch.nn.Sequential(torch.nn.Conv2d(C, 2 * C, 1), torch.nn.BatchNorm2d(2 * C))),
        basic_block(2 * C, 2 * C),
        bottleneck(2 * C, C // 2), bottleneck(2 * C, C // 2),
    )
    model = _randomised(model)
    x = randn(1, C, 4, 4, seed=9)
    _, caught = _captured(model, x, residual="linearised")
    assert len(caught) == 1, caught
    assert "covered 1 of 4" in caught[0] and "1 with maps on both paths" in caught[0]
    assert "2 with more than two linear maps or convolutions" in caught[0]
    _, paper = _captured(model, x)
    assert paper == []


class _ConvResidualBlock(torch.nn.Module):
    """relu(h + bn2(conv3x3(tanh(bn1(conv1x1(h)))))), the 1x1 kernel a scaled channel permutation: every
    hidden element reads one input element, so diagonal activations lose nothing inside the branch and only
    the skip/branch covariance is at stake."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(C, C, 1)
        self.conv2 = torch.nn.Conv2d(C, C, 3, padding=1)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)
        with torch.no_grad():
            self.conv1.weight.copy_((1.5 * torch.eye(C)[torch.randperm(C)]).reshape(C, C, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, h):
        return torch.relu(h + self.bn2(self.conv2(torch.tanh(self.bn1(self.conv1(h))))))


def test_linearised_conv_residual_equals_the_linearised_predictive() -> None:
    model = _randomised(_ConvResidualBlock())
    h = randn(3, C, 5, 5, seed=10)
    variance = 1e-4 * (1 + torch.rand(h.shape, dtype=DTYPE))
    jacobians = torch.func.vmap(torch.func.jacrev(lambda x: model(x[None])[0]))(h).reshape(3, h[0].numel(), -1)
    expected = torch.einsum("bij,bj,bij->bi", jacobians, variance.reshape(3, -1), jacobians).reshape(h.shape)
    got = fxstream.streamline(model, input_var=variance, residual="linearised", backend="eager")(h).var
    torch.testing.assert_close(got, expected)
    independent = fxstream.streamline(model, input_var=variance, backend="eager")(h).var
    assert not torch.allclose(independent, expected, rtol=1e-2)


# Attention branches under the paper's rule: the value path, with the attention probabilities at the means.
HEADS, KV_HEADS = 2, 1


def attention_branch(h, wq, wk, wv, wo, sdpa=True, fused=False, cache=False):
    """Layer norm, Q/K/V projections (fused: one projection split in three, as GPT-2's c_attn), heads,
    attention (causal SDPA, or softmax(q k^T) @ v), heads merged, output projection; GQA where the keys
    and values have fewer heads than the queries; ``cache``: keys and values appended to an empty
    key/value cache first (a decoder's first call)."""
    b, t, _ = h.shape
    x = F.layer_norm(h, (D,))
    if fused:
        q, k, v = F.linear(x, torch.cat([wq, wk, wv])).split([wq.shape[0], wk.shape[0], wv.shape[0]], dim=-1)
    else:
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
    q = q.view(b, t, HEADS, -1).transpose(1, 2)
    k, v = (y.view(b, t, y.shape[-1] // (D // HEADS), -1).transpose(1, 2) for y in (k, v))
    if cache:
        k, v = (torch.cat([y.new_zeros(b, y.shape[1], 0, y.shape[-1]), y], dim=2) for y in (k, v))
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != HEADS)
    else:
        k, v = (y.repeat_interleave(HEADS // y.shape[1], dim=1) for y in (k, v))
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        out = torch.softmax((q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5).masked_fill(~causal, -torch.inf), -1) @ v
    return F.linear(out.transpose(1, 2).reshape(b, t, -1), wo)


@pytest.mark.parametrize("kind", ["sdpa", "sdpa_gqa", "eager", "fused", "cache"])
def test_attention_branch_jacobian_diagonal_equals_jacrev(kind) -> None:
    """diag(J_f) of h + attention(h) with P held at the mean (the paper's attention rule) equals jacrev's."""
    from fxstream.rules.attention import attention_probabilities

    h = 2 * randn(2, 3, D, seed=40)
    kv = D // HEADS * (KV_HEADS if kind == "sdpa_gqa" else HEADS)
    weights = [randn(D, D, seed=41), randn(kv, D, seed=42), randn(kv, D, seed=43), randn(D, D, seed=44)]
    options = dict(sdpa=kind != "eager", fused=kind == "fused", cache=kind == "cache")
    graph_module = make_fx(lambda h, *w: h + attention_branch(h, *w, **options), pre_dispatch=True)(h, *weights)
    held = mean_only_nodes(graph_module.graph, {"norm": "paper", "attention": "paper"})
    joins = residual_joins(graph_module.graph, held, "paper", "paper")
    output = next(iter(graph_module.graph.find_nodes(op="output"))).args[0]
    join = joins.get(output)
    assert join is not None, "the attention join was not recognised"
    values = node_values(graph_module, h, *weights)
    got = join.branch.diagonal(tuple(values[n] for n in join.inputs)).reshape(h.shape)

    x = F.layer_norm(h, (D,))
    q = F.linear(x, weights[0]).view(2, 3, HEADS, -1).transpose(1, 2)
    k = F.linear(x, weights[1]).view(2, 3, kv // (D // HEADS), -1).transpose(1, 2).repeat_interleave(
        HEADS * (D // HEADS) // kv, dim=1)
    p = attention_probabilities(q, k, None, True, None)
    held_norm = _held(layer_norm, h)
    expected = _jacrev_diagonal(lambda y: _oracle_branch(y, held_norm, weights, p), h)
    torch.testing.assert_close(got, expected)


def _oracle_branch(y, norm, weights, p):
    """The value path of the attention branch with the norm's statistics and P held at the mean."""
    b, t, _ = y.shape
    v = F.linear(norm(y), weights[2]).view(b, t, weights[2].shape[0] // (D // HEADS), -1).transpose(1, 2)
    out = p @ v.repeat_interleave(HEADS // v.shape[1], dim=1)
    return F.linear(out.transpose(1, 2).reshape(b, t, -1), weights[3])
