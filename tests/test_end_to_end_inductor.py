"""Inductor agrees with eager, and the ``torch.compile(backend="streamline")`` path agrees with ``streamline``.

Each cold Inductor compile costs 8-30 s on 2 cores, so this module compiles
few distinct graphs: the MLP graph of the first test is reused (warm FX graph
cache) by the torch.compile-path tests, whose outputs are a plain tensor, a
dict and a dataclass around the same network.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxstream

pytestmark = pytest.mark.inductor


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(27, 3))
    return model.eval()


def all_variances(model: nn.Module, scale: float = 1e-2) -> fxstream.Diagonal:
    g = torch.Generator().manual_seed(1)
    return fxstream.Diagonal({n: scale * torch.rand(p.shape, generator=g) for n, p in model.named_parameters()})


def assert_same(actual: fxstream.Predictive, expected: fxstream.Predictive) -> None:
    torch.testing.assert_close(actual.mean, expected.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.var, expected.var, rtol=1e-4, atol=1e-7)
    if expected.cov is not None:
        torch.testing.assert_close(actual.cov, expected.cov, rtol=1e-4, atol=1e-7)


X_MLP = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))


def test_inductor_matches_eager_mlp_diag() -> None:
    model, posterior = mlp(), all_variances(mlp())
    eager = fxstream.streamline(model, posterior, backend="eager")(X_MLP)
    inductor = fxstream.streamline(model, posterior, backend="inductor")(X_MLP)
    assert_same(inductor, eager)


def test_inductor_matches_eager_cnn_full() -> None:
    model = cnn()
    posterior = all_variances(model)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    eager = fxstream.streamline(model, posterior, activation_cov="full", backend="eager")(x)
    inductor = fxstream.streamline(model, posterior, activation_cov="full", backend="inductor")(x)
    assert inductor.cov is not None
    assert_same(inductor, eager)


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


@dataclass
class Output:
    logits: torch.Tensor


class DataclassOutput(DictOutput):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        return Output(self.net(x))


@pytest.mark.parametrize("wrapper", ["tensor", "dict", "dataclass"])
def test_torch_compile_backend_matches_streamline(wrapper: str) -> None:
    """The variance reaches the caller through fxstream.predictive(output) for every output structure."""
    reference = fxstream.streamline(mlp(), all_variances(mlp()), backend="eager")(X_MLP)
    model = {"tensor": mlp, "dict": DictOutput, "dataclass": DataclassOutput}[wrapper]().eval()
    names = {n.removeprefix("net."): n for n, _ in model.named_parameters()}
    posterior = fxstream.Diagonal({names[n]: v for n, v in all_variances(mlp()).variances.items()})
    compiled = torch.compile(model, backend="streamline", options={"posterior": posterior, "backend": "inductor"})
    with torch.no_grad():
        out = compiled(X_MLP)
    logits = {"tensor": lambda o: o, "dict": lambda o: o["logits"], "dataclass": lambda o: o.logits}[wrapper](out)
    assert_same(fxstream.predictive(logits), reference)
    with pytest.raises(fxstream.NoPredictiveError, match="not returned by a streamlined model"):
        fxstream.predictive(logits.clone())


def test_backend_is_registered_by_entry_point_without_importing_fxstream() -> None:
    """torch.compile(backend="streamline") resolves through the torch_dynamo_backends entry point."""
    script = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Linear(4, 3).eval()
        compiled = torch.compile(model, backend="streamline", options={"input_var": 0.1, "backend": "eager"})
        x = torch.randn(2, 4)
        with torch.no_grad():
            out = compiled(x)
        assert "fxstream" in sys.modules, "the entry point should have imported fxstream"
        import fxstream
        expected = (0.1 * model.weight.square().sum(1)).expand(2, 3)
        torch.testing.assert_close(fxstream.predictive(out).var, expected.detach())
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_torch_compile_dynamic_shapes_compile_once() -> None:
    """A graph Dynamo captures with a symbolic batch size is lowered and compiled once, and stays exact.

    (No batch norm here: dynamic=True also makes its float arguments symbolic,
    which capture cannot trace yet; StreamlinedModel keeps them constant.)
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(27, 3)).eval()
    posterior = all_variances(model)
    graphs = []
    compiled = torch.compile(model, backend="streamline", dynamic=True,
                             options={"posterior": posterior, "backend": "inductor", "on_compile": graphs.append})
    reference = fxstream.streamline(model, posterior, backend="eager")
    for batch in (2, 3, 5):
        x = torch.randn(batch, 1, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            out = compiled(x)
        assert_same(fxstream.predictive(out), reference(x))
    assert len(graphs) == 1


# --- transformers through Inductor: every rule option against the eager backend -------------------------------
# Three configurations, one cold compile each (a tiny transformer's is the costliest compile of the suite), that
# together cover SDPA, layer_norm, the embedding, the RMSNorm pattern (statistics held), every linearised option,
# residual joins, pruning and narrowing, variance_matmul="bfloat16", input_var and input_cov.

def _transformer_config(name: str):
    """(model, posterior, args, kwargs, options, bound on the relative variance difference)."""
    transformers_tests = pytest.importorskip("test_transformers")
    from fxstream.select import last_blocks, select

    tiny, weight_variances = transformers_tests.tiny, transformers_tests.weight_variances
    if name == "gpt2-paper-bfloat16":
        # Only the last of two blocks Bayesian: block 0's covariance is pruned, and the paper's attention rule
        # narrows c_attn to V's features. bfloat16 variance GEMMs: eager rounds each product to bfloat16, which
        # Inductor may skip, so the two differ by at most 2^-8 per variance GEMM on the longest path (4 in the
        # block and the tied head), compounded: (1 + 2^-8)^5 - 1.
        model, x = tiny("gpt2")
        posterior = select(model, include=last_blocks(model, 1), exclude=["*ln_*"], variance=1e-4)
        return model, posterior, (x,), {}, {"variance_matmul": "bfloat16"}, (1 + 2**-8) ** 5 - 1
    if name == "gpt2-linearised-input-var":
        # Every linearised option (attention, layer norm, residual joins, products), the embedding table
        # Bayesian, and input variance on inputs_embeds: float64 throughout, so only summation order differs.
        model, ids = tiny("gpt2", layers=1)
        variances = weight_variances(model, 1e-3, with_query_key=True)
        variances["transformer.wte.weight"] = 1e-4 * torch.ones_like(model.transformer.wte.weight)
        options = {"attention": "linearised", "norm": "linearised", "residual": "linearised",
                   "products": "linearised", "input_var": 1e-3}
        embeds = model.transformer.wte(ids).detach()
        return model, fxstream.Diagonal(variances), (), {"inputs_embeds": embeds}, options, 1e-9
    # Llama under the paper's rules (RMSNorm statistics held by rules/patterns.py, SwiGLU's product, RoPE) with
    # full activation covariance and a full input covariance over inputs_embeds. LlamaRMSNorm computes in
    # float32 whatever the model's dtype, so the two backends agree to float32 rounding.
    model, ids = tiny("llama", layers=1)
    embeds = model.model.embed_tokens(ids).detach()
    n = embeds[0].numel()
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) / n
    input_cov = 1e-3 * (a @ a.T + torch.eye(n, dtype=torch.float64))
    posterior = fxstream.Diagonal(weight_variances(model, 1e-3, with_query_key=True))
    return model, posterior, (), {"inputs_embeds": embeds}, {"activation_cov": "full", "input_cov": input_cov}, 1e-5


@pytest.mark.parametrize("name", ["gpt2-paper-bfloat16", "gpt2-linearised-input-var", "llama-full-input-cov"])
def test_transformer_inductor_matches_eager(name: str) -> None:
    pytest.importorskip("transformers")
    model, posterior, args, kwargs, options, bound = _transformer_config(name)
    runs = {}
    for backend in ("eager", "inductor"):
        streamlined = fxstream.streamline(model, posterior, backend=backend, **options)
        runs[backend] = streamlined(*args, **kwargs), streamlined.graphs[0].report
    (eager, eager_report), (inductor, inductor_report) = runs["eager"], runs["inductor"]
    assert inductor_report == eager_report
    if name == "gpt2-paper-bfloat16":
        assert eager_report.pruned > 0 and eager_report.narrowed >= 1
    with torch.no_grad():
        expected_mean = model(*args, **kwargs).logits
    torch.testing.assert_close(inductor.mean, expected_mean, rtol=bound, atol=bound * expected_mean.abs().max())
    relative = ((inductor.var - eager.var).abs() / eager.var).max().item()
    assert relative <= bound, f"{name}: Inductor's variances are {relative:.2e} from eager's (bound {bound:.1e})"
    if eager.cov is not None:
        scale = eager.cov.abs().max()
        assert ((inductor.cov - eager.cov).abs().max() / scale).item() <= bound
