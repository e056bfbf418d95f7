#!/usr/bin/env bash
# The kernels' GPU check, one command, from the source tree with nothing installed:
#     bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
# One global deadline (PEFTMED_GPU_CHECK_DEADLINE, default 480 s, builds included); every step runs under its own
# timeout, cut to what is left of the deadline, and a failing or timed-out step never stops the ones after it:
#   1. builds the CUDA extensions (lora_linear, layer_norm, prefix_attention) side by side with the machine's nvcc;
#      a build stopped by its timeout is recorded as failed (build.log in its cache folder), so nothing later waits
#      on it, and its lock is cleared by the next build
#   2. runs the GPU-marked tests at the target shapes with the Triton kernels compiled (TRITON_INTERPRET unset),
#      bf16 first, against the fp32 reference
#   3. runs the three kernel benchmarks at the target shapes (CUDA events, L2 flushed); each target is written to
#      targets.json the moment it is measured
#   4. runs the other kernel tests, compiled, in what the deadline leaves
#   0. lists every target the benchmarks record (their --list-targets, no GPU needed)
#   5. prints one table: every step, and every target: measured (met / NOT MET) or NOT MEASURED (with the reason)
# --dry-run (or a machine without a CUDA device) runs none of the GPU steps and prints the same table, all NOT
# MEASURED. Everything lands in OUT_DIR (default /tmp/peftmed-gpu-check): logs, CSVs, targets.json, summary.txt.
# The end-to-end training run (benchmarks/gpu_e2e.sh) is a separate call: it does not fit in the same 15 minutes.
set -uo pipefail
# the GPU machine's interpreter holding torch is python3 (PYTHON overrides); nothing is installed there
PY="${PYTHON:-python3}"
python() { "$PY" "$@"; }
export -f python 2>/dev/null || true
export PY
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-${OUT:-/tmp/peftmed-gpu-check}}"
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PEFTMED_TARGETS_JSON="$out/targets.json"
rm -f "$out/targets.json" "$out/steps.tsv"
deadline=$(( SECONDS + ${PEFTMED_GPU_CHECK_DEADLINE:-480} ))
status=0
step() { echo; echo "== $1 ($(date -u +%H:%M:%S), $(( deadline - SECONDS )) s left)"; }
# record NAME RESULT DETAIL: one line of the final table's step section
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$out/steps.tsv"; }
# budget OWN: the timeout a step gets (its own, cut to the deadline); 0 when fewer than 5 s are left
budget() { local left=$(( deadline - SECONDS )); [ "$left" -lt 5 ] && { echo 0; return; }
           [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
# run NAME OWN_TIMEOUT LOG CMD...: CMD under its budget, output to LOG and the terminal; recorded in the table
run() {
  local name="$1" own="$2" log="$3"; shift 3
  local t; t=$(budget "$own")
  if [ "$dry" = 1 ]; then record "$name" "NOT RUN" "dry run (timeout ${own} s)"; return 0; fi
  if [ "$gpu" = 0 ]; then record "$name" "NOT RUN" "no CUDA device"; return 0; fi
  if [ "$t" = 0 ]; then record "$name" "NOT RUN" "global deadline reached"; status=1; return 0; fi
  timeout -k 5 "$t" "$@" > "$log" 2>&1
  local rc=$?
  tail -40 "$log"
  if [ "$rc" = 0 ]; then record "$name" "ok" "${t} s budget"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record "$name" "TIMED OUT" "stopped after ${t} s"; status=1
  else record "$name" "FAILED" "exit code $rc (log: $log)"; status=1; fi
}

step "device"
gpu=0
assume="${PEFTMED_GPU_CHECK_ASSUME_GPU:-0}"  # tests: the GPU path on a machine without one (with a fake build)
if [ "$dry" = 0 ] && [ "$assume" = 1 ]; then gpu=1; echo "assuming a GPU (PEFTMED_GPU_CHECK_ASSUME_GPU=1)"
elif [ "$dry" = 0 ] && python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
python -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable"
[ "$gpu" = 1 ] || echo "no CUDA device$([ "$dry" = 1 ] && echo ' (dry run)'): the GPU steps are listed, not run"

# the benchmarks' arguments (the same for listing their targets and for running them)
LORA_ARGS=(--device cuda --rounds 30 --no-compile --out "$out")
LN_ARGS=(--device cuda --rounds 50 --out "$out")
PREFIX_ARGS=(--device cuda --skip-model --rounds 10 --out "$out")
step "0. every target the benchmarks record (listed in the background while the extensions build; no GPU needed)"
rm -f "$out"/expected-*.json
listing=()
timeout 60 "$PY" benchmarks/kernels/bench_lora_linear.py --list-targets "${LORA_ARGS[@]}" \
  > "$out/expected-bench_lora_linear.json" 2> "$out/expected.log" & listing+=($!)
timeout 60 "$PY" benchmarks/kernels/bench_layer_norm.py --list-targets "${LN_ARGS[@]}" \
  > "$out/expected-bench_layer_norm.json" 2>> "$out/expected.log" & listing+=($!)
timeout 60 "$PY" benchmarks/kernels/bench_prefix_attention.py --list-targets "${PREFIX_ARGS[@]}" \
  > "$out/expected-bench_prefix_attention.json" 2>> "$out/expected.log" & listing+=($!)

step "1. CUDA extensions (built side by side)"
build_one() {
  local name="$1"
  if [ -n "${PEFTMED_GPU_CHECK_FAKE_BUILD_SECONDS:-}" ]; then  # tests: a build that hangs
    sleep "$PEFTMED_GPU_CHECK_FAKE_BUILD_SECONDS"; return 0
  fi
  python -c "
import time
from peftmed.kernels import build
t0 = time.perf_counter()
try:
    build.load_extension('$name')
    print(f'built $name in {time.perf_counter() - t0:.0f} s')
except Exception as e:
    print(f'FAILED $name: {e}')
    raise SystemExit(1)
"
}
export -f build_one
builds=()
for name in lora_linear_cuda layer_norm_cuda prefix_attention_cuda; do
  run "build $name" 150 "$out/build-$name.log" bash -c "build_one $name" & builds+=($!)
done
wait "${builds[@]}"
if [ "$gpu" = 1 ] && [ "$dry" = 0 ] && [ "$assume" = 0 ]; then
  for name in lora_linear_cuda layer_norm_cuda prefix_attention_cuda; do
    if ! grep -q "^built" "$out/build-$name.log" 2>/dev/null; then  # stopped or failed: nothing later waits on it
      python -c "
from peftmed.kernels import build
f = build.build_folder('$name'); f.mkdir(parents=True, exist_ok=True)
if not (f / 'build.log').exists():
    (f / 'build.log').write_text('error: the build did not finish within benchmarks/gpu_check.sh timeout')
" || true
    fi
  done
fi

step "2. the GPU target tests, compiled (bf16 first)"
run "tests: GPU targets, bf16" 120 "$out/tests-gpu.log" "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels/test_gpu_targets.py -k "bfloat16 or not float" --junitxml="$out/tests-gpu.xml"

step "3. benchmarks at the target shapes"
# the first call of each Triton configuration compiles (about 20 per prefix head dim): the timeouts hold them
run "bench_lora_linear" 90 "$out/bench_lora_linear.txt" "$PY" benchmarks/kernels/bench_lora_linear.py "${LORA_ARGS[@]}"
run "bench_layer_norm" 120 "$out/bench_layer_norm.txt" "$PY" benchmarks/kernels/bench_layer_norm.py "${LN_ARGS[@]}"
run "bench_prefix_attention" 150 "$out/bench_prefix_attention.txt" "$PY" benchmarks/kernels/bench_prefix_attention.py \
  "${PREFIX_ARGS[@]}"
# where LoRA's time goes: each kernel against cuBLAS or a copy, and a sweep of the main GEMM's tiles (no targets)
run "bench_lora_breakdown" 75 "$out/bench_lora_breakdown.txt" "$PY" benchmarks/kernels/bench_lora_breakdown.py \
  --rounds 10

step "4. the other kernel tests, compiled (what the deadline leaves)"
run "tests: kernels" 120 "$out/tests-kernels.log" "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels/test_gpu_targets.py tests/kernels/test_cuda_sources.py tests/kernels/test_lora_linear.py \
  tests/kernels/test_layer_norm.py tests/kernels/test_prefix_attention.py --junitxml="$out/tests.xml"

wait "${listing[@]}"  # (each under its own 60 s timeout)
step "5. targets"
python benchmarks/kernels/gpu_summary.py "$out" "$([ "$assume" = 1 ] && echo 0 || echo "$gpu")" | tee "$out/summary.txt"
exit $status
