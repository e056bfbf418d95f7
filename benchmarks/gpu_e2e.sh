#!/usr/bin/env bash
# The GPU end-to-end run of real sizes (< 5 minutes on one H100/H200), from the source tree, nothing installed:
#   bash benchmarks/gpu_e2e.sh [OUT_DIR]
# A separate device call from benchmarks/gpu_check.sh: the two do not fit in one 15-minute device session together.
# bitsandbytes (for the NF4 row) is used when importable; else a wheel carried in wheels/ (pip download
# bitsandbytes==0.50.2 --no-deps -d wheels) is unpacked into a temporary folder; else the NF4 row says "not run".
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/peftmed-e2e}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if ! python -c "import bitsandbytes" 2>/dev/null; then
  wheel=$(ls wheels/bitsandbytes-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    site=$(mktemp -d)
    python -m zipfile -e "$wheel" "$site"
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 python benchmarks/e2e/gpu_e2e.py --steps 150 --json "$out/gpu_e2e.json" | tee "$out/gpu_e2e.txt"
