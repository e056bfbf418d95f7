"""The GPU check's final table (``benchmarks/gpu_check.sh`` step 5), from what the check left in its folder:

    python benchmarks/kernels/gpu_summary.py OUT_DIR GPU(0|1)

``steps.tsv`` (every step: ok / FAILED / TIMED OUT / NOT RUN and why), ``targets.json`` (each target as it was
measured) and ``expected-<bench>.json`` (every target each benchmark records, its ``--list-targets``): every target
gets a line, measured (met / NOT MET) or NOT MEASURED with its benchmark's step result.
"""


from __future__ import annotations

import json
import sys
from pathlib import Path

PREFIXES = {"bench_lora_linear": "LoRA", "bench_layer_norm": "LayerNorm", "bench_prefix_attention": "prefix attention"}


def main(out: Path, gpu: bool) -> None:
    rows = json.loads((out / "targets.json").read_text()) if (out / "targets.json").exists() else []
    steps = [ln.rstrip("\n").split("\t") for ln in (out / "steps.tsv").read_text().splitlines()] \
        if (out / "steps.tsv").exists() else []
    if gpu:
        import torch
        import triton
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    else:
        print("no CUDA device: nothing measured")
    print("\nsteps")
    for name, result, detail in steps:
        print(f"  {name:<32} {result:<10} {detail}")
    expected = {}
    for bench in PREFIXES:  # what each benchmark records (its --list-targets), so that every target has a line
        try:
            expected[bench] = json.loads((out / f"expected-{bench}.json").read_text())
        except Exception:  # not listed (an error is in expected.log): the benchmark's measured ones, or one line
            expected[bench] = []
    w = max([len(r["target"]) for r in rows] + [len(e["target"]) for es in expected.values() for e in es] + [40])
    print(f"\n{'target':<{w}}  {'figure':>9}  {'goal':>8}  result")
    missing = 0
    for bench, prefix in PREFIXES.items():
        mine = [r for r in rows if r["target"].startswith(prefix)]
        why = next((f"{res}: {det}" for n, res, det in steps if n == bench), "not run")
        for r in mine:
            print(f"{r['target']:<{w}}  {r['figure']:>9}  {r['goal']:>8}  {'met' if r['met'] else 'NOT MET'}")
        measured = {r["target"] for r in mine}
        for e in expected[bench]:
            if e["target"] not in measured:
                missing += 1
                print(f"{e['target']:<{w}}  {'-':>9}  {e['goal']:>8}  NOT MEASURED ({bench} {why})")
        if not mine and not expected[bench]:
            missing += 1
            print(f"{prefix + ' targets (' + bench + ')':<{w}}  {'-':>9}  {'-':>8}  NOT MEASURED ({bench} {why})")
    print(f"{sum(r['met'] for r in rows)} of {len(rows)} measured targets met; {missing} NOT MEASURED")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "1")
