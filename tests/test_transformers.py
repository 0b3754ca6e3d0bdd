"""Transformers from the `transformers` library, unchanged, end to end on the eager backend.

Tiny configs with random weights (float64, so that Monte Carlo, not rounding,
sets the tolerance): GPT-2 (tied lm_head), ViT, BERT, Llama (RoPE, RMSNorm,
SwiGLU, grouped-query attention) and Phi-3 (Llama's blocks with fused
projections: Q, K and V sliced from one layer, gate and up split from one),
each with SDPA and eager attention.

Monte Carlo samples exactly the weights the rule treats as uncertain. Under
the paper's attention rule that excludes query and key weights (GPT-2 and
Phi-3 pack Q, K and V in one matrix: its Q/K part gets zero variance). The measured
gaps (residual branches and diagonal activations are approximations) are kept
as regression guards; `python benchmarks/bench_transformers.py --accuracy`
prints the table.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import fxstream
from fxstream.select import last_blocks, select

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (requirements/extras.txt)")

DTYPE = torch.float64
MODELS = ("gpt2", "vit", "bert", "llama", "phi3")


def tiny(name: str, attention: str = "sdpa", vocab: int = 97, layers: int = 2):
    """A tiny random-weight model of the family and a seeded input batch."""
    torch.manual_seed(0)
    common = dict(attn_implementation=attention)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=vocab, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, **common)
        model, x = transformers.GPT2LMHeadModel(config), torch.randint(0, vocab, (2, 8))
    elif name == "vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                        intermediate_size=64, image_size=16, patch_size=4, num_labels=5, **common)
        model, x = transformers.ViTForImageClassification(config), torch.randn(2, 3, 16, 16, dtype=DTYPE)
    elif name == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=32,
                                         num_labels=3, **common)
        model, x = transformers.BertForSequenceClassification(config), torch.randint(0, vocab, (2, 8))
    else:
        config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                     "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[name]
        config = config_class(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=vocab, max_position_embeddings=32, bos_token_id=0,
                              eos_token_id=0, pad_token_id=0, **common)
        model, x = model_class(config), torch.randint(0, vocab, (2, 8))
    return model.to(DTYPE).eval(), x


def weight_variances(model: torch.nn.Module, scale: float, with_query_key: bool) -> dict[str, torch.Tensor]:
    """Variances for the weight matrices of every block (scale * mean |W|^2); Q/K get zero unless asked.

    BERT: the encoder's only (see below)."""
    variances = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
            continue
        if name.startswith(("classifier.", "bert.pooler.")) and type(model).__name__.startswith("Bert"):
            # BERT's pooler and classifier are left deterministic: at initializer_range 0.02 their variance
            # swamps the encoder's, and every rule option then gives the same numbers (a guard on the head only).
            continue
        var = scale * p.detach().abs().mean().square() * torch.ones_like(p)
        if not with_query_key:
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                continue
            if name.endswith("c_attn.weight"):
                var[:, : 2 * (p.shape[1] // 3)] = 0  # GPT-2 Conv1D (in, 3 out): Q and K columns
            if name.endswith("qkv_proj.weight"):  # Phi-3 (Q, K, V out, in): Q and K rows
                config = model.config
                head = config.hidden_size // config.num_attention_heads
                var[: (config.num_attention_heads + config.num_key_value_heads) * head] = 0
        variances[name] = var
    return variances


def monte_carlo_variance(model, x, variances, samples: int, seed: int = 0, chunk: int = 500) -> torch.Tensor:
    """Variance of the logits over weights drawn from the diagonal Gaussian ``variances``."""
    return monte_carlo_moments(model, x, variances, samples, seed, chunk)[0]


def monte_carlo_moments(model, x, variances, samples: int, seed: int = 0,
                        chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monte Carlo variance of the logits and its relative standard error per element.

    The standard error of a sample variance is sqrt((m4 - var^2) / n), with m4 the fourth central moment
    (estimated from the same draws, no Gaussian assumption); relative: divided by the variance.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        centre = model(x).logits  # moments about the mean network's output, then shifted: no cancellation
    g = torch.Generator().manual_seed(seed)
    sums = [0, 0, 0, 0]
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        drawn = {name: p + (variances[name].sqrt() * torch.randn(n, *p.shape, generator=g, dtype=p.dtype)
                            if name in variances else 0 * p.expand(n, *p.shape))
                 for name, p in params.items()}
        d = vmap(lambda ps: functional_call(model, ps, (x,)).logits)(drawn) - centre
        sums = [total + d.pow(k + 1).sum(0) for k, total in enumerate(sums)]
    m1, m2, m3, m4 = (total / samples for total in sums)
    var = m2 - m1.square()
    fourth = m4 - 4 * m1 * m3 + 6 * m1.square() * m2 - 3 * m1.pow(4)
    return var, ((fourth - var.square()).clamp_min(0) / samples).sqrt() / var


def relative_errors(var: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Median and 90th percentile of |var - reference| / reference."""
    rel = ((var - reference).abs() / reference).flatten()
    return rel.median().item(), rel.quantile(0.9).item()


def streamlined_var(model, x, variances, **options) -> fxstream.Predictive:
    return fxstream.streamline(model, fxstream.Diagonal(variances), backend="eager", **options)(x)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_means_equal_the_deterministic_forward(name, attention):
    model, x = tiny(name, attention)
    predictive = streamlined_var(model, x, weight_variances(model, 1e-3, with_query_key=True))
    with torch.no_grad():
        expected = model(x).logits
    assert torch.equal(predictive.mean, expected)


@pytest.mark.parametrize("name", MODELS)
def test_head_alone_bayesian_gives_the_closed_form(name):
    """Only the output head uncertain: the logits are linear in it, so their variance is exact, h^2 @ V^T + v_b
    with h the head's input (read by a hook). GPT-2's head is tied to the embedding, so there the final layer
    norm's bias b is the uncertain one: logits = (... + b) @ wte^T, variance v_b @ (wte^2)^T."""
    model, x = tiny(name)
    if name == "gpt2":
        bias = model.transformer.ln_f.bias
        v_b = 1e-3 * torch.rand(bias.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
        predictive = streamlined_var(model, x, {"transformer.ln_f.bias": v_b})
        expected = (v_b @ model.transformer.wte.weight.detach().square().T).expand(predictive.mean.shape)
    else:
        head_name = "classifier" if name in ("vit", "bert") else "lm_head"
        head = getattr(model, head_name)
        g = torch.Generator().manual_seed(3)
        variances = {f"{head_name}.{n}": 1e-3 * torch.rand(p.shape, generator=g, dtype=DTYPE)
                     for n, p in head.named_parameters()}
        seen = []
        hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            model(x)
        hook.remove()
        predictive = streamlined_var(model, x, variances)
        expected = seen[0].square() @ variances[f"{head_name}.weight"].T
        if f"{head_name}.bias" in variances:
            expected = expected + variances[f"{head_name}.bias"]
    torch.testing.assert_close(predictive.var, expected, rtol=1e-9, atol=0)


# Regression guards: (median, p90) of the relative variance error measured against Monte Carlo with
# REFERENCE_SAMPLES draws, from benchmarks/results/transformers_accuracy.md (regenerate with the command in its
# header), with that table's "MC SE" columns: the median and p90 over outputs of the Monte Carlo variances'
# relative standard error (from the draws' fourth moments). The test draws the same REFERENCE_SAMPLES weights with
# the same seed, so the Monte Carlo noise is common to the table and the test; a guard fails when the error moves
# past the measured one by more than three standard errors of the Monte Carlo estimate, the resolution below which
# Monte Carlo cannot tell two predictives apart.
REFERENCE_SAMPLES = 10_000
GUARDS = {  # (name, setting) -> measured (median, p90) and the reference's relative SE (median, p90)
    ("gpt2", "paper"): ((0.081, 0.232), (0.014, 0.014)),
    ("gpt2", "norm-linearised"): ((0.067, 0.166), (0.014, 0.014)),
    ("gpt2", "full"): ((0.039, 0.101), (0.014, 0.014)),
    ("vit", "paper"): ((0.042, 0.085), (0.014, 0.014)),
    ("vit", "norm-linearised"): ((0.025, 0.095), (0.014, 0.014)),
    ("vit", "full"): ((0.007, 0.068), (0.014, 0.014)),
    ("bert", "paper"): ((0.095, 0.173), (0.014, 0.014)),
    ("bert", "norm-linearised"): ((0.047, 0.172), (0.014, 0.014)),
    ("bert", "full"): ((0.003, 0.017), (0.014, 0.014)),
    ("llama", "paper"): ((0.063, 0.16), (0.014, 0.014)),
    ("llama", "norm-linearised"): ((0.069, 0.166), (0.014, 0.014)),
    ("llama", "full"): ((0.026, 0.079), (0.014, 0.014)),
    ("phi3", "paper"): ((0.055, 0.128), (0.014, 0.014)),
    ("phi3", "norm-linearised"): ((0.06, 0.135), (0.014, 0.014)),
    ("phi3", "full"): ((0.019, 0.049), (0.014, 0.014)),
}
SETTINGS = {
    "paper": {},
    "norm-linearised": {"norm": "linearised"},
    "full": {"activation_cov": "full", "norm": "linearised"},
}


@functools.lru_cache(maxsize=None)
def monte_carlo_reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The table's Monte Carlo variance (same draws) and relative SE of a tiny model's logits, once per model."""
    model, x = tiny(name)
    return monte_carlo_moments(model, x, weight_variances(model, 1e-3, with_query_key=False), REFERENCE_SAMPLES)


@pytest.mark.parametrize("name, setting", list(GUARDS))
def test_variances_agree_with_monte_carlo(name, setting):
    """Sampling exactly the weights the paper's attention rule treats as uncertain (no Q/K)."""
    model, x = tiny(name)
    variances = weight_variances(model, 1e-3, with_query_key=False)
    predictive = streamlined_var(model, x, variances, **SETTINGS[setting])
    reference, se = monte_carlo_reference(name)
    median, p90 = relative_errors(predictive.var, reference)
    (measured_median, measured_p90), (table_se_median, table_se_p90) = GUARDS[name, setting]
    se_median, se_p90 = se.median().item(), se.quantile(0.9).item()
    # The same draws as the table's: their standard errors agree with its columns (printed to 3 decimals).
    assert abs(se_median - table_se_median) <= 6e-4 and abs(se_p90 - table_se_p90) <= 6e-4, (se_median, se_p90)
    bound_median, bound_p90 = measured_median + 3 * se_median, measured_p90 + 3 * se_p90
    assert median <= bound_median and p90 <= bound_p90, \
        f"{name} {setting}: median {median:.3f} (bound {bound_median:.3f}), p90 {p90:.3f} (bound {bound_p90:.3f})"


@pytest.mark.parametrize("name", ["gpt2", "llama", "phi3"])
def test_eager_attention_matches_sdpa_under_the_paper_rule(name):
    """The hand-written attention (softmax held at the mean by rules/patterns.py) and the fused SDPA
    rule compute the same thing: var_O = P^2 @ var_V."""
    variances = None
    results = []
    for attention in ("sdpa", "eager"):
        model, x = tiny(name, attention)
        variances = variances or weight_variances(model, 1e-3, with_query_key=True)
        results.append(streamlined_var(model, x, variances).var)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


class OneHead(torch.nn.Module):
    """One causal SDPA head whose queries, keys and values come from three Bayesian linear layers."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        q, k, v = (layer(x)[:, None] for layer in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]


def test_linearised_attention_is_exactly_the_linearisation():
    """attention="linearised" with uncertain queries and keys: with full activations and products="linearised"
    the pass is first order throughout, and Q, K, V come from independent weights, so its covariance must be
    J Sigma J^T over the three layers' weights (torch.func.jacrev) to float precision. The paper's rule, which
    drops the Q/K part (here about a quarter of the variance), must not be."""
    model = OneHead().to(DTYPE).eval()
    x = 2 * torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    g = torch.Generator().manual_seed(2)
    variances = {n: 0.05 * torch.rand(p.shape, generator=g, dtype=DTYPE) for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda chosen: functional_call(model, chosen, (x,)).reshape(-1))(params)
    dense = sum(j.reshape(j.shape[0], -1) * variances[n].reshape(1, -1) @ j.reshape(j.shape[0], -1).T
                for n, j in jac.items())
    n = dense.shape[0] // 2
    expected = dense.reshape(2, n, 2, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    covs = {}
    for attention in ("linearised", "paper"):
        covs[attention] = fxstream.streamline(model, fxstream.Diagonal(variances), activation_cov="full",
                                              products="linearised", attention=attention,
                                              backend="eager")(x).cov.reshape(2, n, n)
    torch.testing.assert_close(covs["linearised"], expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    assert (covs["paper"] - expected).abs().max() > 0.1 * expected.abs().max()


def test_rms_norm_paper_rule_holds_the_statistic():
    """Llama's hand-written RMSNorm: under norm="paper" the output covariance is J S J^T of the norm with
    the statistic held at its value for the mean input (full activation covariance, exact)."""
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(6, eps=1e-5).to(DTYPE).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
    x = torch.randn(2, 3, 6, dtype=DTYPE)
    input_var = 0.01 * torch.rand(2, 3, 6, dtype=DTYPE)
    predictive = fxstream.streamline(norm, input_var=input_var, activation_cov="full", backend="eager")(x)
    # LlamaRMSNorm casts to float32 for the statistic and the scaling whatever the input dtype, and the
    # variance follows the same casts, so the match is exact to float32 rounding.
    scale = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-5).to(DTYPE)
    expected = input_var * (scale * norm.weight).square()
    torch.testing.assert_close(predictive.var, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_rms_norm_linearised_is_the_jacobian(structure):
    """Llama's hand-written RMSNorm under norm="linearised": the variance must be diag(J S J^T) per token, J the
    norm's Jacobian at the mean (torch.func.jacrev; diagonal plus rank one), to LlamaRMSNorm's float32 rounding."""
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(6, eps=1e-5).to(DTYPE).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    input_var = 0.01 * torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    predictive = fxstream.streamline(norm, input_var=input_var, activation_cov=structure, norm="linearised",
                                     backend="eager")(x)
    jac = torch.stack([torch.stack([jacrev(lambda row: norm(row[None, None])[0, 0])(x[b, t]) for t in range(3)])
                       for b in range(2)])
    expected = torch.einsum("btij,btj,btij->bti", jac, input_var, jac)
    torch.testing.assert_close(predictive.var, expected, rtol=1e-5, atol=0)


def test_tied_lm_head_is_one_posterior_entry():
    """GPT-2's lm_head shares wte: one posterior entry, used by the embedding and the head. The diag
    rules treat the two uses as independent; Monte Carlo samples the shared matrix. Measured gap guarded."""
    model, x = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    variances = {"transformer.wte.weight": 1e-3 * model.transformer.wte.weight.detach().abs().mean().square()
                 * torch.ones_like(model.transformer.wte.weight)}
    predictive = streamlined_var(model, x, variances)
    median, p90 = relative_errors(predictive.var, monte_carlo_variance(model, x, variances, 4000))
    assert median <= 0.12 and p90 <= 0.35, f"tied wte: median {median:.3f}, p90 {p90:.3f}"


def test_large_vocabulary_needs_nothing_vocab_squared():
    """A 50257-token head: per-logit variances, and no tensor in the run as large as vocab^2 or
    params x vocab (the biggest is a few times the (vocab, d) table or the (B, T, vocab) logits)."""
    vocab = 50257
    model, x = tiny("gpt2", vocab=vocab)
    posterior = select(model, include=["transformer.wte.weight", *last_blocks(model, 1)], variance=1e-6)
    streamlined = fxstream.streamline(model, posterior, backend="eager")
    predictive = streamlined(x)
    assert predictive.var.shape == (2, 8, vocab)
    (graph,) = streamlined.graphs
    largest = LargestTensor(graph.paired.graph_module)
    largest.run(*concrete(graph.captured.example_inputs))
    logits, table = 2 * 8 * vocab, vocab * 32
    assert largest.numel <= 2 * max(logits, table), f"largest tensor has {largest.numel} elements"
    kappa = 1 / (1 + torch.pi / 8 * predictive.var).sqrt()  # probit over 50257 classes, by its closed form
    torch.testing.assert_close(predictive.probs("probit"), torch.softmax(predictive.mean * kappa, -1),
                               rtol=1e-12, atol=1e-15)


def concrete(example_inputs: list) -> list:
    """A capture's example inputs with each symbolic size replaced by the size it was captured at."""
    return [a.node.hint if isinstance(a, torch.SymInt) else a for a in example_inputs]


class LargestTensor(torch.fx.Interpreter):
    """Runs a graph and records the element count of the largest tensor any node produces."""

    numel = 0

    def run_node(self, node):
        result = super().run_node(node)
        for value in result if isinstance(result, (list, tuple)) else (result,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return result


def test_probit_next_token_probabilities_track_monte_carlo():
    """With a broad posterior, probit probabilities from the one-pass predictive are much closer to Monte
    Carlo's averaged softmax than the plain softmax of the mean logits."""
    model, x = tiny("gpt2")
    variances = weight_variances(model, 30.0, with_query_key=False)
    predictive = streamlined_var(model, x, variances)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    drawn = {n: p + (variances[n].sqrt() * torch.randn(2000, *p.shape, generator=g, dtype=DTYPE)
                     if n in variances else 0 * p.expand(2000, *p.shape)) for n, p in params.items()}
    mc = vmap(lambda ps: functional_call(model, ps, (x,)).logits.softmax(-1))(drawn).mean(0)
    probit_gap = (predictive.probs("probit") - mc).abs().sum(-1).mean()
    plain_gap = (predictive.mean.softmax(-1) - mc).abs().sum(-1).mean()
    assert probit_gap < 0.5 * plain_gap, f"probit {probit_gap:.4f} vs plain softmax {plain_gap:.4f}"


def test_select_builds_posteriors_by_pattern():
    model, _ = tiny("gpt2")
    blocks = last_blocks(model, 1)
    assert blocks == ["transformer.h.1.*"]
    posterior = select(model, include=blocks, exclude=["*.bias", "*ln_*"], variance=2e-3)
    assert sorted(posterior.parameter_names()) == [
        "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
    ]
    assert all((posterior.covariance(n).tensors[0] == 2e-3).all() for n in posterior.parameter_names())
    source = fxstream.Diagonal({n: torch.full_like(p, 0.5) for n, p in model.named_parameters()})
    subset = select(model, include=["*.mlp.*"], variance=source)
    assert set(subset.parameter_names()) == {n for n, _ in model.named_parameters() if ".mlp." in n}
    assert (subset.covariance("transformer.h.0.mlp.c_fc.weight").tensors[0] == 0.5).all()
    with pytest.raises(fxstream.PosteriorMismatchError, match="no parameter matches"):
        select(model, include=["*.nonexistent"])
    with pytest.raises(fxstream.PosteriorMismatchError, match="cannot take the last 3"):
        last_blocks(model, 3)


def test_pruning_skips_everything_below_the_first_bayesian_block():
    """With only the last block Bayesian, no covariance node belongs to the embeddings or block 0."""
    model, x = tiny("gpt2")
    streamlined = fxstream.streamline(model, select(model, include=last_blocks(model, 1)), backend="eager")
    streamlined(x)
    graph = streamlined.graphs[0]
    owners = {n.meta["fxstream"]["of"] for n in graph.paired.graph_module.graph.nodes
              if n.meta.get("fxstream", {}).get("role") == "cov"}
    first_block = {n.name for n in graph.captured.graph_module.graph.nodes
                   if any("h.0" in str(path) or "wte" in str(path) or "wpe" in str(path)
                          for path, _ in (n.meta.get("nn_module_stack") or {}).values())}
    assert owners and not owners & first_block
    everything = fxstream.streamline(model, select(model), backend="eager")
    everything(x)
    assert graph.report.kept < everything.graphs[0].report.kept


def narrowing(model, x, posterior, attention: str, monkeypatch) -> tuple:
    """(variances, FLOPs, narrowed layers) with pruning's narrowing, then the same without it."""
    import importlib

    from torch.utils.flop_counter import FlopCounterMode

    def run():
        streamlined = fxstream.streamline(model, posterior, backend="eager", attention=attention)
        var = streamlined(x).var
        graph = streamlined.graphs[-1]
        # The ATen graph a call runs, with the concrete sizes of this call for its symbolic ones.
        inputs = concrete(graph.captured.example_inputs)
        with FlopCounterMode(display=False) as counter:
            graph.lowered(*inputs)
        return var, counter.get_total_flops(), graph.report.narrowed

    narrowed = run()
    monkeypatch.setattr(importlib.import_module("fxstream.passes.prune"), "_narrow", lambda split: False)
    return narrowed, run()


@pytest.mark.parametrize("attention", ["paper", "linearised"])
@pytest.mark.parametrize("name", ["gpt2", "phi3"])
def test_fused_query_key_value_layer_computes_only_the_variances_attention_reads(name, attention, monkeypatch):
    """GPT-2's c_attn (split) and Phi-3's qkv_proj (sliced) pack Q, K and V. The paper's rule reads only V's
    variances, so pruning narrows the layer to V's features: the predictive is unchanged, and the FLOPs of
    Q and K's variance GEMMs (two per layer, each 2 * tokens * d * (Q and K features)) are gone. Under
    attention="linearised" all three are read."""
    model, x = tiny(name)
    posterior = select(model, include=["*.weight"], exclude=["*ln_*", "*wpe*", "*norm*"], variance=1e-4)
    (var, flops, narrowed), (whole_var, whole_flops, _) = narrowing(model, x, posterior, attention, monkeypatch)
    torch.testing.assert_close(var, whole_var, rtol=1e-12, atol=0)
    config = model.config
    layers, tokens, width = config.num_hidden_layers, x.numel(), config.hidden_size
    heads = config.num_attention_heads
    query_key = 2 * width if name == "gpt2" else (heads + config.num_key_value_heads) * (width // heads)
    saved = layers * 2 * (2 * tokens * width * query_key) if attention == "paper" else 0
    assert (narrowed, whole_flops - flops) == (layers if attention == "paper" else 0, saved)
    assert not var.isnan().any()


class FusedProjectionAttention(torch.nn.Module):
    """One nn.Linear without bias makes Q, K and V, split apart (``pieces="split"``) or sliced off
    (``"slice"``, as Phi-3 does), then SDPA and a head."""

    def __init__(self, pieces: str, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.pieces, self.heads = pieces, heads
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x)
        if self.pieces == "split":
            parts = qkv.split(width, dim=-1)
        else:
            parts = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in parts)
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


@pytest.mark.parametrize("pieces", ["split", "slice"])
def test_fused_linear_projection_is_narrowed_too(pieces, monkeypatch):
    torch.manual_seed(0)
    model, x = FusedProjectionAttention(pieces).to(DTYPE).eval(), torch.randn(2, 5, 8, dtype=DTYPE)
    posterior = select(model, include=["qkv.weight"], variance=1e-3)
    (var, flops, narrowed), (whole_var, whole_flops, _) = narrowing(model, x, posterior, "paper", monkeypatch)
    torch.testing.assert_close(var, whole_var, rtol=1e-12, atol=0)
    tokens, width = x.shape[0] * x.shape[1], x.shape[2]
    assert (narrowed, whole_flops - flops) == (1, 2 * tokens * width * 2 * width)  # x^2 @ V^T, Q and K columns
