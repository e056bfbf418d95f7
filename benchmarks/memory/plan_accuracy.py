"""How close `peftmed plan` comes to real training steps, measured by means that share no code with it.

    python benchmarks/memory/plan_accuracy.py                  # every setting (about 10 minutes on 2 cores)
    python benchmarks/memory/plan_accuracy.py --only miss-base-ln-b2
    python benchmarks/memory/plan_accuracy.py --device cuda    # on a GPU: torch.cuda.max_memory_allocated

Per setting, two fresh processes. The first builds the full model as a run does (recipe, base dtype, 4-bit,
checkpointing) and runs two real training steps (forward, backward, AdamW's update) on the batch size and text
lengths of the setting; the second (AdamW's states exist from the first on, as in any longer run) is measured
by:
  - the allocator's own records: torch.profiler with profile_memory=True records every allocation and free of
    the step (its raw "[memory]" events, in time order); the peak of their running sum is the step's peak, to which the bytes held before the
    step are added (the model's parameters' and buffers' storages and AdamW's states, summed) (on a GPU instead:
    torch.cuda.max_memory_allocated, reset before the step);
  - the process's peak resident set: VmHWM reset just before the step (/proc/self/clear_refs), its growth
    over the resident set before the step, plus the same model bytes (it includes the allocator's caching).
The second process runs `peftmed plan` for the setting and times it. The error is the plan's estimate against
the allocator's records; the target is within 10% on every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024**2
MISS_5M = dict(size="base", vision_width=128, vision_heads=2, vision_layers=2, text_width=128, text_heads=2,
               text_layers=2, intermediate_size=512, image_size=128)
MISS_34M = dict(size="base", vision_width=256, vision_heads=4, vision_layers=6, text_width=256, text_heads=4,
                text_layers=6, intermediate_size=1024, image_size=224)
LLAVA_130M = dict(preset="llava-v1-7b", width_divisor=8, vision_layers=4, text_layers=4)
SETTINGS = {
    # name: (backbone, recipe, keyword arguments of plan_memory)
    "miss-5m-full-b4": ("miss", "*=full", dict(batch_size=4, seq_len=16, backbone_options=MISS_5M)),
    "miss-34m-lora-b4": ("miss", "*=lora(r=8)", dict(batch_size=4, seq_len=20, backbone_options=MISS_34M)),
    "miss-34m-ln-ckpt-b4": ("miss", "*=layernorm", dict(batch_size=4, seq_len=20, grad_checkpoint="all",
                                                        backbone_options=MISS_34M)),
    "miss-34m-ptv2-bf16-b4": ("miss", "fusion=ptuning-v2(n=10) decoder=ptuning-v2(n=10)", dict(
        batch_size=4, seq_len=20, base_dtype="bf16", backbone_options=MISS_34M)),
    "miss-base-lora-b1": ("miss-base", "*=lora(r=8)", dict(batch_size=1, seq_len=35)),
    "miss-base-ln-b2": ("miss-base", "*=layernorm", dict(batch_size=2, seq_len=35)),
    "miss-34m-nf4-bf16-b4": ("miss", "*=lora(r=8)", dict(
        batch_size=4, seq_len=20, base_dtype="bf16", quantize="nf4", quantize_components="fusion,decoder",
        backbone_options=MISS_34M)),
    "blip-base-ptv2-b4": ("blip-vqa-base", "fusion=ptuning-v2(n=10) decoder=ptuning-v2(n=10)", dict(
        batch_size=4, seq_len=35)),
    "blip-base-prefix-ckpt-b1": ("blip-vqa-base", "fusion=prefix(n=10) decoder=prefix(n=10)", dict(
        batch_size=1, seq_len=35, grad_checkpoint="all")),
    "blip-base-lora-bf16-b2": ("blip-vqa-base", "vision=lora(r=8) decoder=lora(r=8)", dict(
        batch_size=2, seq_len=35, base_dtype="bf16")),
    "llava-130m-ln-lora-b2": ("hf-llava", "vision=layernorm llm=lora(r=16)", dict(
        batch_size=2, seq_len=24, backbone_options=LLAVA_130M)),
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(name: str, device: str) -> dict:
    backbone_name, recipe, kw = SETTINGS[name]
    return measure(backbone_name, recipe, device=device, **kw)


def measure(backbone_name: str, recipe: str, *, device: str = "cpu", **kw) -> dict:
    """The real training step of a setting (``kw``: plan_memory's keyword arguments), measured by the allocator's
    records and the resident set: {params, model_mib (held before the step), allocator_mib, rss_mib}."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import peftmed
    from peftmed.memory import prepare
    from peftmed.memory.plan import synthetic_batch
    from peftmed.runtime import adamw

    registry = peftmed.default_registry()
    backbone = registry.backbone(backbone_name)
    options = dict(kw.get("backbone_options") or {})
    options.setdefault("max_question_tokens", kw["seq_len"])
    options.setdefault("max_answer_tokens", kw.get("answer_len", 8))
    dev = torch.device(device)
    torch.manual_seed(0)
    model = backbone.build(**options)
    pm = peftmed.apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
    prepare(pm, base_dtype=kw.get("base_dtype", "fp32"), grad_checkpoint=kw.get("grad_checkpoint"),
            quantize=kw.get("quantize", "none"), quantize_components=kw.get("quantize_components"),
            device=dev if kw.get("quantize", "none") != "none" else None)
    pm.to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    batch = synthetic_batch(model, kw["batch_size"], kw["seq_len"], kw.get("answer_len", 8), int(model.image_size))
    batch["images"] = batch["images"].to(dev)
    optimizer = adamw([p for p in pm.parameters() if p.requires_grad], lr=1e-6)  # as the trainer makes it

    def step():
        optimizer.zero_grad(set_to_none=True)  # as the trainer does at the start of each step
        with peftmed.memory.autocast_for(pm, dev):
            out = pm.loss_terms(batch) if callable(getattr(pm, "loss_terms", None)) else pm.compute_loss(batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.float().backward()
        optimizer.step()

    step()  # the first step creates AdamW's states; training holds them from then on: measure the second
    optimizer.zero_grad(set_to_none=True)
    held = [*pm.parameters(), *pm.buffers()] + [t for st in optimizer.state.values() for t in st.values()
                                                 if torch.is_tensor(t)]
    model_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        return {"params": params, "model_mib": model_bytes / MIB,
                "allocator_mib": (model_bytes + torch.cuda.max_memory_allocated(dev) - start) / MIB, "rss_mib": None}
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS: the peak from here on
        f.write("5")
    rss_before = _status("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rss_growth = _status("VmHWM") - rss_before
    running = peak = 0
    allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(allocations, key=lambda e: e.start_ns()):  # every allocation (+) and free (-), in order
        running += event.nbytes()
        peak = max(peak, running)
    return {"params": params, "model_mib": model_bytes / MIB, "allocator_mib": (model_bytes + peak) / MIB,
            "rss_mib": (model_bytes + rss_growth) / MIB}


def _plan(name: str, device: str) -> dict:
    from peftmed.memory.plan import plan_memory

    backbone, recipe, kw = SETTINGS[name]
    t0 = time.perf_counter()
    plan = plan_memory(backbone, recipe, device=device, **kw)
    return {"estimate_mib": plan.total / MIB, "plan_s": time.perf_counter() - t0,
            "method": plan.settings.get("activations")}


def _worker(kind: str, name: str, device: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--only", name, "--device", device],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else str(out.returncode))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", action="append", choices=list(SETTINGS), help="run these settings only")
    p.add_argument("--worker", choices=["measure", "plan"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.worker:
        fn = _measure if args.worker == "measure" else _plan
        print(json.dumps(fn(args.only[0], args.device)))
        return 0
    rows = []
    print(f"{'setting':<24} {'params':>8} {'estimate':>10} {'allocator':>10} {'error':>7} {'peak RSS':>10} "
          f"{'plan s':>7}")
    for name in args.only or SETTINGS:
        try:
            row = {"setting": name, **_worker("measure", name, args.device), **_worker("plan", name, args.device)}
        except RuntimeError as exc:
            print(f"{name:<24} failed: {exc}")
            continue
        row["error"] = (row["estimate_mib"] - row["allocator_mib"]) / row["allocator_mib"]
        rows.append(row)
        rss = f"{row['rss_mib']:.0f} MiB" if row["rss_mib"] is not None else "-"
        print(f"{name:<24} {row['params'] / 1e6:>7.1f}M {row['estimate_mib']:>6.0f} MiB {row['allocator_mib']:>6.0f} MiB "
              f"{100 * row['error']:>+6.1f}% {rss:>10} {row['plan_s']:>7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    worst = max((abs(r["error"]) for r in rows), default=0)
    print(f"largest error: {100 * worst:.1f}% over {len(rows)} settings (target: within 10%)")
    return 0 if rows and worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
