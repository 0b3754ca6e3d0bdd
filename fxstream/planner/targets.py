"""Models the planner and the CLI can load by name: small built-ins, or ``module:callable``.

A target is a model in eval mode, an example input, and which input
dimensions are the symbolic sizes (batch, seq). Transformer targets are small
configs built offline with ``transformers``; they exist only when it is
installed. Every built-in is seeded, so the same name gives the same weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import FxstreamError
from .symbolic import Dims


@dataclass
class Target:
    """A model, an example call ``model(*args)``, and the symbolic dimensions of its inputs."""

    name: str
    model: torch.nn.Module
    args: tuple
    dims: Dims


def _mlp() -> Target:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    return Target("mlp", model, (torch.randn(4, 64),), {(0, 0): "batch"})


def _cnn() -> Target:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )
    return Target("cnn", model, (torch.randn(4, 1, 16, 16),), {(0, 0): "batch"})


def _tokens(vocab: int) -> tuple:
    return (torch.randint(0, vocab, (2, 8)),)


def _gpt2() -> Target:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=128, use_cache=False,
                        tie_word_embeddings=False, attn_implementation="sdpa")
    return Target("gpt2", GPT2LMHeadModel(config), _tokens(128), {(0, 0): "batch", (0, 1): "seq"})


def _bert() -> Target:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=128, num_labels=3, attn_implementation="sdpa")
    return Target("bert", BertForSequenceClassification(config), _tokens(128), {(0, 0): "batch", (0, 1): "seq"})


def _llama() -> Target:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=128, use_cache=False,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return Target("llama", LlamaForCausalLM(config), _tokens(128), {(0, 0): "batch", (0, 1): "seq"})


def _vit() -> Target:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8, num_channels=3, num_labels=10, attn_implementation="sdpa")
    return Target("vit", ViTForImageClassification(config), (torch.randn(2, 3, 32, 32),), {(0, 0): "batch"})


BUILTINS: dict[str, tuple[Callable[[], Target], str | None]] = {
    "mlp": (_mlp, None),
    "cnn": (_cnn, None),
    "gpt2": (_gpt2, "transformers"),
    "bert": (_bert, "transformers"),
    "llama": (_llama, "transformers"),
    "vit": (_vit, "transformers"),
}


def available() -> list[str]:
    """Built-in target names whose packages are installed."""
    return [name for name, (_, package) in BUILTINS.items()
            if package is None or importlib.util.find_spec(package) is not None]


def load(spec: str, seed: int = 0) -> Target:
    """A built-in target by name, or ``module:callable`` returning ``(model, example_input)``.

    ``module`` is imported from the current directory too (as well as from ``sys.path``).

    For a callable target, dim 0 of the first input is "batch", and dim 1 of an
    integer (token id) input is "seq".
    """
    torch.manual_seed(seed)
    if spec in BUILTINS:
        make, package = BUILTINS[spec]
        if package is not None and importlib.util.find_spec(package) is None:
            raise FxstreamError(f"target '{spec}' needs the '{package}' package: pip install {package}")
        target = make()
    elif ":" in spec:
        target = _from_callable(spec)
    else:
        raise FxstreamError(f"unknown target '{spec}': use one of {available()} or 'module:callable'")
    target.model.eval()
    return target


def _from_callable(spec: str) -> Target:
    module_name, _, attribute = spec.partition(":")
    # Import from the current directory, as `python -m` would: the `fxstream` script's own
    # directory, not the user's, is what Python puts first on sys.path.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FxstreamError(f"cannot import module '{module_name}' of target '{spec}': {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise FxstreamError(f"'{attribute}' in module '{module_name}' is not a callable returning (model, input)")
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise FxstreamError(f"target '{spec}' must return (model, example_input), got {type(made).__name__}")
    model, example = made
    args = example if isinstance(example, tuple) else (example,)
    first = args[0]
    dims = {(0, 0): "batch"}
    if not torch.is_floating_point(first) and first.dim() >= 2:
        dims[(0, 1)] = "seq"
    return Target(spec, model, args, dims)
