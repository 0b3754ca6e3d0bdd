"""Imports of optional libraries that need help on the CPU build of torch these machines use."""

from __future__ import annotations

import importlib.util
import sys
import types


def make_torchvision_importable() -> None:
    """Let ``import torchvision`` (and so timm, torchmetrics, laplace-torch) work without its compiled ops.

    The registry's torchvision wheel is a CUDA build: on a CPU torch its ops never
    register and ``torchvision/_meta_registrations.py`` fails with "operator
    torchvision::nms does not exist". Its model builders are pure Python, so where
    that happens the module is replaced by an empty one and the import retried.
    Does nothing where torchvision is absent or imports as it is.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
