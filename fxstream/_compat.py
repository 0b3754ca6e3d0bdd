"""Imports of optional libraries that need help on the CPU build of torch these machines use."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def make_torchvision_importable() -> None:
    """Let ``import torchvision`` (and so timm, transformers, torchmetrics, laplace-torch) work without its ops.

    The registry's torchvision wheel is a CUDA build: on a CPU torch its compiled
    ops never load, and ``torchvision/_meta_registrations.py`` then fails with
    "operator torchvision::nms does not exist" at import. Its model builders are
    pure Python, so where the compiled ops cannot load, that module is replaced
    by an empty one before anything imports torchvision. Does nothing where
    torchvision is absent, already imported, or its ops load (fxstream calls
    this when it is imported; it costs one failed library load at most).
    """
    if "torchvision" in sys.modules or "torchvision._meta_registrations" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libraries = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        for library in libraries:
            torch.ops.load_library(str(library))
        if libraries:
            return
    except OSError:
        pass
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
