#!/usr/bin/env bash
# Create .venv with the pinned CPU torch, fxstream (editable) with its test
# dependencies, the optional laplace-torch stack, and requirements/extras.txt
# when present. Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The pinned CPU wheel first: a bare "torch" requirement resolves to a CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# laplace-torch's declared dependencies would pull torchvision and a CUDA torch.
"${PIP[@]}" --no-deps -r requirements/laplace.txt
# The zoo's torchvision and timm: --no-deps for the same reason (see requirements/zoo.txt).
"${PIP[@]}" --no-deps -r requirements/zoo.txt
# Optional libraries that do not depend on torch (transformers, gguf, ivon-opt):
# a normal install resolves their own pure-Python dependencies.
if [ -f requirements/extras.txt ]; then
    "${PIP[@]}" -r requirements/extras.txt
fi
.venv/bin/python -c "import torch, fxstream; print(f'fxstream {fxstream.__version__} ready: torch {torch.__version__}, $(pwd)/.venv')"
