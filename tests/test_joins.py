"""joins="exact": with full activations and first-order rules, the predictive is J Sigma J^T for any branching.

Oracles: the parameter Jacobian from torch.func.jacrev (float64) with every weight
Bayesian, on residual MLPs, a residual CNN with batch norm and a downsampling
shortcut, a DenseNet-style concat, a SwiGLU gate, tiny GPT-2 and Llama; and
laplace-torch's own GLM predictive of a diagonal Laplace over a residual network.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fxstream
from fxstream.passes.lower import is_plain_aten
from fxstream.passes.pair import output_variances

DTYPE = torch.float64
FIRST_ORDER = dict(activation_cov="full", products="linearised", norm="linearised", attention="linearised")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ResidualMLP(nn.Module):
    """Two residual blocks, the second nested inside a third skip: forks that compose."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        inner = h + self.blocks[0](h)
        return self.out(h + inner + self.blocks[1](inner))


class ResidualCNN(nn.Module):
    """A basic block with batch norm, then a strided block with a 1x1 conv shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                  nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.down = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.Tanh())
        self.shortcut = nn.Conv2d(3, 4, 1, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.body(h))
        h = self.down(h) + self.shortcut(h)
        return self.head(h.mean((2, 3)))


class DenseConcat(nn.Module):
    """DenseNet's concat of a tensor with what was computed from it, and a SwiGLU gate of one input."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.grow, self.gate, self.up, self.out = (nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(8, 6),
                                                             nn.Linear(8, 6), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        dense = torch.cat([h, torch.sigmoid(self.grow(h))], dim=-1)
        return self.out(nn.functional.silu(self.gate(dense)) * self.up(dense))


def batch_norm_statistics(model: nn.Module) -> nn.Module:
    for i, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        module.running_mean.normal_(0, 0.3, generator=seeded(i))
        module.running_var.uniform_(0.5, 2.0, generator=seeded(i + 10))
    return model


def variances(model: nn.Module, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = seeded(5)
    return {n: scale * (0.5 + torch.rand(p.shape, generator=g, dtype=DTYPE)) for n, p in model.named_parameters()}


def parameter_oracle(model: nn.Module, var: dict, x, output=lambda out: out) -> torch.Tensor:
    """Per-sample J Sigma J^T (B, N, N), J = d f(x) / d theta over the parameters in ``var``: each a
    variance per entry (the parameter's shape) or a covariance (n, n) over its row-major entries."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(chosen):
        return output(functional_call(model, {**params, **chosen}, (x,))).reshape(-1)

    jac = jacrev(f)({n: params[n] for n in var})
    covariances = {n: c if c.shape != params[n].shape else torch.diag_embed(c.reshape(-1)) for n, c in var.items()}
    dense = sum(j.reshape(j.shape[0], -1) @ covariances[n] @ j.reshape(j.shape[0], -1).T for n, j in jac.items())
    batch = x.shape[0]
    n = dense.shape[0] // batch
    return dense.reshape(batch, n, batch, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.reshape(expected.shape) - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("make, shape", [(ResidualMLP, (3, 4)), (ResidualCNN, (2, 1, 6, 6)), (DenseConcat, (3, 4))],
                         ids=["residual-mlp", "residual-cnn-bn", "dense-concat-swiglu"])
def test_exact_joins_equal_glm_with_every_weight_bayesian(make, shape) -> None:
    torch.manual_seed(0)
    model = batch_norm_statistics(make().to(DTYPE)).eval()
    x = torch.randn(*shape, generator=seeded(1), dtype=DTYPE)
    var = variances(model)
    expected = parameter_oracle(model, var, x)
    exact = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact", **FIRST_ORDER)(x)
    independent = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", **FIRST_ORDER)(x)
    assert torch.equal(exact.mean, independent.mean)
    assert relative_error(exact.cov, expected) < 1e-12
    assert relative_error(independent.cov, expected) > 1e-3  # the joins matter in each of these models


def norms_in_model_dtype(model: nn.Module) -> nn.Module:
    """Llama's RMSNorm casts to float32 inside a float64 model, which would limit any comparison to float32
    rounding (6e-8): the same norm, computed in the model's dtype."""
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)
    return model


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_exact_joins_equal_glm_on_transformers(name: str) -> None:
    """Residual stream, Q/K/V from one input (GPT-2 splits one projection), SwiGLU: all joins; every
    parameter Bayesian, GPT-2's embedding tied to its head included. Mistral's sliding-window mask is an
    expanded tensor, whose elements share memory."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=11,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=1, sliding_window=3,
                                                                           **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **common))
    model = norms_in_model_dtype(model.to(DTYPE)).eval()
    x = torch.randint(0, 11, (2, 5), generator=seeded(2))
    var = variances(model)  # GPT-2's embedding is its head's weight too: a parameter read twice
    expected = parameter_oracle(model, var, x, output=lambda out: out.logits)
    streamlined = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact", **FIRST_ORDER)
    pred = streamlined(x)
    assert relative_error(pred.cov, expected) < 1e-12
    (graph,) = streamlined.graphs  # what ran is the graph lowered to ATen: no rule code, no forward-mode AD
    assert all(is_plain_aten(node) for node in graph.lowered.graph.nodes)
    rules = {node.meta.get("fxstream", {}).get("rule") for node in graph.paired.graph_module.graph.nodes}
    assert "exact_join" in rules
    variances_only = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact",
                                         output_cov="diag", **FIRST_ORDER)
    pred = variances_only(x)
    assert pred.cov is None
    assert relative_error(pred.var, expected.diagonal(dim1=-2, dim2=-1)) < 1e-12
    (graph,) = variances_only.graphs  # the head's rule made the variances from its input's full covariance,
    assert graph.paired.cov_kinds == ["diag"]  # but for GPT-2's tied head: its cross terms need the full output
    fallback = graph.paired.graph_module.graph.find_nodes(op="call_function", target=output_variances)
    assert bool(fallback) is (name == "gpt2")


def test_exact_joins_equal_glm_on_a_vit() -> None:
    """Every ViT parameter Bayesian, the patch convolution, class token and position embeddings included:
    the class token and the patches meet in the encoder's residual stream and attention."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                    image_size=8, patch_size=4, num_labels=3)
    model = transformers.ViTForImageClassification(config).to(DTYPE).eval()
    x = torch.randn(2, 3, 8, 8, generator=seeded(2), dtype=DTYPE)
    var = variances(model)
    expected = parameter_oracle(model, var, x, output=lambda out: out.logits)
    pred = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact", **FIRST_ORDER)(x)
    assert relative_error(pred.cov, expected) < 1e-12


def test_exact_joins_equal_glm_on_albert_with_shared_layers() -> None:
    """ALBERT reads one layer's weights in every layer, ties its embedding to the decoder and looks up one
    token-type row at every position: parameters read more than once, all Bayesian. Token 0 is its padding
    row, to which torch's embedding gives no gradient, so jacrev would miss that row's variance: the tokens
    here start at 1."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=11, embedding_size=4, hidden_size=8, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=8, max_position_embeddings=8)
    model = transformers.AlbertForMaskedLM(config).to(DTYPE).eval()
    x = torch.randint(1, 11, (2, 4), generator=seeded(2))
    var = variances(model)
    expected = parameter_oracle(model, var, x, output=lambda out: out.logits)
    pred = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact", **FIRST_ORDER)(x)
    assert relative_error(pred.cov, expected) < 1e-12


class SharedLayer(nn.Module):
    """One linear layer applied twice (weight and bias read twice), as ALBERT or a recurrent cell does."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        return self.out(h + torch.tanh(self.shared(h)))


def _shared_weight_posterior(kind: str, weight: torch.Tensor) -> tuple[fxstream.Posterior, torch.Tensor]:
    """A posterior of the given kind on ``weight`` (4, 4), and its covariance (16, 16) from the kind's
    definition (the oracle's own construction of it)."""
    g = seeded(7)
    spd = lambda n: (lambda a: 1e-2 * (a @ a.T / n + 0.1 * torch.eye(n, dtype=DTYPE)))(  # noqa: E731
        torch.randn(n, n, generator=g, dtype=DTYPE))
    if kind == "kfac":
        out_factor, in_factor = spd(4), spd(4)
        dense = torch.einsum("kl,ij->kilj", out_factor, in_factor).reshape(16, 16)  # Cov(W_ki, W_lj) = B_kl A_ij
        return fxstream.KFAC({"shared.weight": (out_factor, in_factor)}), dense
    if kind == "kfac-eig":
        (l_out, q_out), (l_in, q_in) = torch.linalg.eigh(spd(4) * 100), torch.linalg.eigh(spd(4) * 100)
        precision = 50.0 * torch.kron(q_out @ torch.diag(l_out) @ q_out.T, q_in @ torch.diag(l_in) @ q_in.T) \
            + 20.0 * torch.eye(16, dtype=DTYPE)
        return (fxstream.KFAC.from_eigen({"shared.weight": [(q_out, l_out), (q_in, l_in)]}, 20.0, 50.0),
                torch.linalg.inv(precision))
    if kind == "dense":
        dense = spd(16)
        return fxstream.Dense({"shared.weight": dense}, {"shared.weight": weight.shape}), dense
    diagonal = 1e-3 * torch.rand(4, 4, generator=g, dtype=DTYPE)
    factors = 3e-2 * torch.randn(2, 4, 4, generator=g, dtype=DTYPE)
    dense = torch.diag_embed(diagonal.reshape(-1)) + sum(torch.outer(u.reshape(-1), u.reshape(-1)) for u in factors)
    return fxstream.LowRank({"shared.weight": diagonal}, {"shared.weight": factors}), dense


@pytest.mark.parametrize("kind", ["kfac", "kfac-eig", "dense", "lowrank"])
def test_exact_joins_carry_a_shared_weight_of_any_posterior_kind(kind: str) -> None:
    """The weight read twice is a fork: its covariance, formed dense from the posterior's structure, is
    pushed through both reads, and the two reads' cross terms meet where the paths join."""
    torch.manual_seed(0)
    model = SharedLayer().to(DTYPE).eval()
    x = torch.randn(3, 4, generator=seeded(1), dtype=DTYPE)
    posterior, dense = _shared_weight_posterior(kind, model.shared.weight)
    bias = {"shared.bias": 1e-3 * torch.ones(4, dtype=DTYPE)}
    expected = parameter_oracle(model, {"shared.weight": dense, **bias}, x)
    exact = fxstream.streamline(model, fxstream.Mixed(posterior, fxstream.Diagonal(bias)), backend="eager",
                                joins="exact", **FIRST_ORDER)
    pred = exact(x)
    assert relative_error(pred.cov, expected) < 1e-12
    (graph,) = exact.graphs
    ties = [node for node in graph.paired.graph_module.graph.find_nodes(op="placeholder")
            if node.meta["fxstream"].get("tie") == "carried"]
    assert len(ties) == 2  # the weight and the bias


class TiedTransposed(nn.Module):
    """A head that reads the embedding table through a transpose (x @ E^T): a tie the pass cannot carry."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(ids)) @ self.embed.weight.t()


def test_a_tie_that_exact_joins_cannot_carry_is_named_in_a_warning() -> None:
    """A read through an op that transforms the parameter before it meets data drops the covariance between
    the reads: the warning names the parameter and the op; the result is then not J Sigma J^T."""
    torch.manual_seed(0)
    model = TiedTransposed().to(DTYPE).eval()
    x = torch.randint(0, 7, (2, 3), generator=seeded(2))
    var = variances(model)
    streamlined = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", joins="exact", **FIRST_ORDER)
    with pytest.warns(fxstream.FxstreamWarning, match=r"embed\.weight \(.*applies aten\.t\.default to it"):
        pred = streamlined(x)
    assert relative_error(pred.cov, parameter_oracle(model, var, x)) > 1e-3


class TokenTypes(nn.Module):
    """BERT's embeddings: a token-type table looked up by a constant index (all 0) at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.words, self.types, self.out = nn.Embedding(7, 4), nn.Embedding(2, 4), nn.Linear(4, 3)
        self.register_buffer("type_ids", torch.zeros(1, 8, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        types = self.type_ids[:, :ids.shape[1]].expand(ids.shape[0], -1)
        return self.out(torch.tanh(self.words(ids) + self.types(types)))


def test_a_table_read_at_every_position_correlates_the_positions() -> None:
    """Every position reads the same token-type row, so in full mode its entries are one random vector
    repeated: the lookup's output is an activation, whose rule keeps that, not a parameter of independent
    entries. No join here: the independent first-order setting is already J Sigma J^T."""
    torch.manual_seed(0)
    model = TokenTypes().to(DTYPE).eval()
    x = torch.randint(0, 7, (2, 5), generator=seeded(2))
    var = {"types.weight": 1e-2 * torch.ones(2, 4, dtype=DTYPE)}
    pred = fxstream.streamline(model, fxstream.Diagonal(var), backend="eager", **FIRST_ORDER)(x)
    assert relative_error(pred.cov, parameter_oracle(model, var, x)) < 1e-12


@pytest.mark.parametrize("case, from_layer", [("diagonal-head", True), ("kron-head", False),
                                              ("softmax-output", False)])
def test_output_variances_are_the_full_outputs_diagonal(case: str, from_layer: bool) -> None:
    """output_cov="diag" with the exact moments (products="moments"): the diagonal of the full output's
    covariance. The head's rule makes it from its input's row blocks where a diagonal head posterior needs
    no more; a Kronecker head posterior meets E[x x^T] whole, and a softmax output has no layer before it:
    there the full output is formed and its diagonal taken."""
    torch.manual_seed(0)
    model = ResidualMLP().to(DTYPE).eval()
    head = "out"
    if case == "softmax-output":
        model, head = nn.Sequential(model, nn.Softmax(-1)).eval(), "0.out"
    x = torch.randn(3, 4, generator=seeded(1), dtype=DTYPE)
    var = variances(model)
    posterior = fxstream.Diagonal(var)
    if case == "kron-head":
        weight = dict(model.named_parameters())[f"{head}.weight"]
        factors = (1e-2 * torch.eye(weight.shape[0], dtype=DTYPE) + 1e-3,
                   1e-1 * torch.eye(weight.shape[1], dtype=DTYPE))
        posterior = fxstream.Mixed(fxstream.Diagonal({n: v for n, v in var.items() if n != f"{head}.weight"}),
                                   fxstream.KFAC({f"{head}.weight": factors}))
    options = dict(FIRST_ORDER, products="moments", joins="exact", backend="eager")
    full = fxstream.streamline(model, posterior, **options)(x)
    streamlined = fxstream.streamline(model, posterior, output_cov="diag", **options)
    pred = streamlined(x)
    assert pred.cov is None
    assert relative_error(pred.var, full.var) < 1e-12
    fallback = streamlined.graphs[0].paired.graph_module.graph.find_nodes(op="call_function", target=output_variances)
    assert bool(fallback) is not from_layer


def test_exact_joins_equal_laplace_torch_glm_on_a_residual_network() -> None:
    """A diagonal Laplace over every weight of a residual MLP (regression): laplace-torch's GLM f_var, built
    from per-output Jacobians, equals the one-pass predictive."""
    laplace = pytest.importorskip("laplace")
    torch.manual_seed(0)
    model = ResidualMLP().to(DTYPE)
    x = torch.randn(40, 4, generator=seeded(3), dtype=DTYPE)
    y = torch.randn(40, 3, generator=seeded(4), dtype=DTYPE)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    la = laplace.Laplace(copy.deepcopy(model), "regression", subset_of_weights="all", hessian_structure="diag",
                         prior_precision=5.0)
    la.fit(loader)
    _, f_var = la(x[:6], pred_type="glm")
    pred = fxstream.streamline(la.model.eval(), fxstream.from_laplace(la), backend="eager", joins="exact",
                               **FIRST_ORDER)(x[:6])
    assert relative_error(pred.cov, f_var) < 1e-10


def test_exact_joins_compile_with_inductor() -> None:
    """The lowered graph with its cross-covariances compiles (one cold compile) and equals the eager run."""
    torch.manual_seed(0)
    model = ResidualMLP().eval()
    x = torch.randn(5, 4, generator=seeded(3))
    posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-2) for n, p in model.named_parameters()})
    eager = fxstream.streamline(model, posterior, backend="eager", joins="exact", **FIRST_ORDER)(x)
    compiled = fxstream.streamline(model, posterior, backend="inductor", joins="exact", **FIRST_ORDER)(x)
    torch.testing.assert_close(compiled.cov, eager.cov, rtol=1e-5, atol=1e-7)


def test_exact_joins_need_full_activations() -> None:
    model = ResidualMLP().to(DTYPE).eval()
    with pytest.raises(fxstream.FxstreamError, match="activation_cov='full'"):
        fxstream.streamline(model, fxstream.Diagonal(variances(model)), backend="eager", joins="exact")


@pytest.mark.parametrize("make", [ResidualMLP, SharedLayer], ids=["residual-mlp", "shared-layer"])
def test_planner_costs_the_cross_covariances(make) -> None:
    """The cost model's peak for a joins="exact" graph (cross-covariances of shape (B, N_t, N_u), with a
    parameter read twice (N, N) and (B, N_t, N)) equals the allocator's, off the sizes it was fitted at
    (1%: exact on CPU, as for the other structures)."""
    from fxstream.planner import cost_report
    from fxstream.planner.measure import profiler_peak
    from fxstream.planner.symbolic import capture_symbolic

    torch.manual_seed(0)
    model = make().eval()
    sym = capture_symbolic(model, (torch.randn(4, 4),), {(0, 0): "batch"})
    options = fxstream.StreamlineOptions(posterior=fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in
                                                                      model.named_parameters()}),
                                         activation_cov="full", rule_options={"joins": "exact"}, model=model)
    paired = fxstream.pipeline.rewrite(sym.captured, options).paired
    report = cost_report(sym, paired)
    for batch in (9, 40):
        inputs = sym.graph_inputs({"batch": batch}, lambda p, s: torch.randn(s))
        measured = profiler_peak(paired.graph_module, *inputs)
        assert abs(report.peak_at({"batch": batch}) - measured) <= 0.01 * measured, (batch, measured)
