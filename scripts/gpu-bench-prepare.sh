#!/usr/bin/env bash
# Prepares bench-carry/ for scripts/gpu-bench.sh on a machine with Rust and internet access to
# crates.io and PyPI: a cuda-enabled drover-node and the coordinator (stripped, xz) and diffusers
# wheels for Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p drover-node --features cuda --bin drover-node
cargo build -p drover-coordinator --bin drover-coordinator
mkdir -p bench-carry/wheels
for bin in drover-node drover-coordinator; do
    strip -o "bench-carry/$bin" "target/debug/$bin"
    xz -f -T2 "bench-carry/$bin"
done
pip download -q diffusers --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d bench-carry/wheels
rm -f bench-carry/wheels/numpy-*.whl
du -sh bench-carry
