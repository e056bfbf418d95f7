#!/usr/bin/env bash
# The kernels' GPU check, one command (its steps' timeouts add up to 8 minutes on one H100/H200: build 150 s,
# tests 135 s, benchmarks 60 + 75 + 60 s; torch.compile's baseline runs for LayerNorm only, whose target names
# it), from the source tree with nothing
# installed:  bash benchmarks/gpu_check.sh [OUT_DIR]
#   1. builds the CUDA extensions (lora_linear, layer_norm, prefix_attention) with the machine's nvcc
#   2. runs the kernel tests with the Triton kernels compiled (TRITON_INTERPRET unset) and the GPU-marked
#      tests at the target shapes, bf16 / fp16 / fp32, against the fp32 reference
#   3. runs the three kernel benchmarks at the target shapes (CUDA events, L2 flushed)
#   4. prints one table of every target: figure, goal, met / not met
# Everything lands in OUT_DIR (default /tmp/peftmed-gpu-check): logs, CSVs, targets.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/peftmed-gpu-check}}"
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
rm -f "$out/targets.json"
status=0
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "1. CUDA extensions (built side by side)"
for name in lora_linear_cuda layer_norm_cuda prefix_attention_cuda; do
  timeout 150 python -c "
import sys, time
from peftmed.kernels import build
t0 = time.perf_counter()
try:
    build.load_extension('$name')
    print(f'built $name in {time.perf_counter() - t0:.0f} s')
except Exception as e:
    print(f'FAILED $name: {e}')
" > "$out/build-$name.log" 2>&1 &
done
wait
cat "$out"/build-*.log | tee "$out/build.log"
grep -q FAILED "$out/build.log" && status=1
grep -q "^built" "$out/build.log" || status=1

step "2. kernel tests, compiled"
timeout 135 python -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_targets.py tests/kernels/test_cuda_sources.py \
  tests/kernels/test_lora_linear.py tests/kernels/test_layer_norm.py tests/kernels/test_prefix_attention.py \
  -x --junitxml="$out/tests.xml" 2>&1 | tail -40 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "3. benchmarks at the target shapes"
timeout 60 python benchmarks/kernels/bench_lora_linear.py --device cuda --rounds 30 --no-compile --out "$out" \
  --targets-json "$out/targets.json" 2>&1 | tee "$out/bench_lora_linear.txt" || status=1
timeout 75 python benchmarks/kernels/bench_layer_norm.py --device cuda --rounds 50 --out "$out" \
  --targets-json "$out/targets.json" 2>&1 | tee "$out/bench_layer_norm.txt" || status=1
timeout 60 python benchmarks/kernels/bench_prefix_attention.py --device cuda --skip-model --rounds 10 \
  --out "$out" --targets-json "$out/targets.json" 2>&1 | tee "$out/bench_prefix_attention.txt" || status=1

step "4. targets"
python - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
import torch, triton
out = Path(sys.argv[1])
rows = json.loads((out / "targets.json").read_text()) if (out / "targets.json").exists() else []
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
w = max([len(r["target"]) for r in rows] + [6])
print(f"{'target':<{w}}  {'figure':>9}  {'goal':>8}  result")
for r in rows:
    print(f"{r['target']:<{w}}  {r['figure']:>9}  {r['goal']:>8}  {'met' if r['met'] else 'NOT MET'}")
print(f"{sum(r['met'] for r in rows)} of {len(rows)} targets met")
EOF
exit $status
