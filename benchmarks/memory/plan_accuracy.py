"""How close `peftmed plan` comes to real training steps: its estimate beside the measured peak, per setting.

    python benchmarks/memory/plan_accuracy.py                 # the CPU settings (about 6 minutes on 2 cores)
    python benchmarks/memory/plan_accuracy.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated
    python benchmarks/memory/plan_accuracy.py --only miss-34m # one setting

Measured, per setting, in a fresh process each: (1) the peak of live tensor memory of one real training step
of the full model (forward, backward, AdamW update) plus its weights: on a CPU counted at the dispatcher
(peftmed.memory.plan.LiveTensors), on a GPU torch.cuda.max_memory_allocated; (2) on a CPU also the growth
of the process's peak resident set (VmHWM) from before the model is built, which includes the allocator's
and the libraries' own overhead. The estimate comes from `peftmed plan` (shallow copies, extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024**2
MISS_34M = dict(size="base", vision_width=256, vision_heads=4, vision_layers=6, text_width=256, text_heads=4,
                text_layers=6, intermediate_size=1024, image_size=224)
SETTINGS = {
    # name: (backbone, recipe, keyword arguments of plan_memory / measure_training_step)
    "miss-34m": ("miss", "*=lora(r=8)", dict(batch_size=4, seq_len=20, backbone_options=MISS_34M)),
    "miss-34m-ckpt": ("miss", "*=lora(r=8)", dict(batch_size=4, seq_len=20, grad_checkpoint="all",
                                                  backbone_options=MISS_34M)),
    "miss-34m-bf16": ("miss", "vision=layernorm fusion=lora(r=8) decoder=full", dict(
        batch_size=4, seq_len=20, base_dtype="bf16", backbone_options=MISS_34M)),
    "miss-base-b1": ("miss-base", "*=lora(r=8)", dict(batch_size=1, seq_len=35)),
    "miss-base-b2-ckpt": ("miss-base", "vision=layernorm fusion=lora(r=8) decoder=lora(r=8)", dict(
        batch_size=2, seq_len=35, grad_checkpoint="all")),
    "miss-base-b2-bf16-nf4": ("miss-base", "*=lora(r=8)", dict(
        batch_size=2, seq_len=35, base_dtype="bf16", quantize="nf4", quantize_components="fusion,decoder")),
    "blip-base-b2-bf16": ("blip-vqa-base", "vision=lora(r=8) decoder=lora(r=8)", dict(
        batch_size=2, seq_len=35, base_dtype="bf16")),
    "blip-base-b1-prefix-ckpt": ("blip-vqa-base", "fusion=prefix(n=10) decoder=prefix(n=10)", dict(
        batch_size=1, seq_len=35, grad_checkpoint="all")),
}


def _one(name: str, device: str) -> dict:
    """Runs in a fresh process: the measured step first (its peak RSS), then the plan."""
    import torch

    from peftmed.bench.memory import MemoryProbe
    from peftmed.memory.plan import measure_training_step, plan_memory

    backbone, recipe, kw = SETTINGS[name]
    probe = MemoryProbe(torch.device(device))
    probe.start()
    t0 = time.perf_counter()
    real = measure_training_step(backbone, recipe, device=device, **kw)
    rss = probe.peak_mib() if device == "cpu" else None
    t1 = time.perf_counter()
    plan = plan_memory(backbone, recipe, device=device, **kw)
    t2 = time.perf_counter()
    params = real["weights"]
    return {"setting": name, "backbone": backbone, "recipe": recipe, **{k: v for k, v in kw.items()
                                                                        if k != "backbone_options"},
            "estimate_mib": plan.total / MIB, "measured_mib": real["total"] / MIB, "rss_growth_mib": rss,
            "weights_mib": params / MIB, "estimate_s": t2 - t1, "measured_s": t1 - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", action="append", choices=list(SETTINGS), help="run these settings only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_one(args.worker, args.device)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    print(f"{'setting':<26} {'estimate':>10} {'measured':>10} {'error':>7} {'RSS growth':>11} {'plan s':>7}")
    for name in args.only or SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--device", args.device],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<26} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        err = 100 * (row["estimate_mib"] - row["measured_mib"]) / row["measured_mib"]
        rss = f"{row['rss_growth_mib']:.0f} MiB" if row["rss_growth_mib"] is not None else "-"
        print(f"{name:<26} {row['estimate_mib']:>6.0f} MiB {row['measured_mib']:>6.0f} MiB {err:>+6.1f}% {rss:>11} "
              f"{row['estimate_s']:>7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    worst = max((abs(r["estimate_mib"] - r["measured_mib"]) / r["measured_mib"] for r in rows), default=0)
    print(f"largest error: {100 * worst:.1f}% over {len(rows)} settings (target: within 15%)")
    return 0 if rows and worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
