"""The GPU end-to-end run of real sizes (run through benchmarks/gpu_e2e.sh, < 5 minutes on one H100/H200).

Trains miss-base and blip-vqa-base with LoRA, LayerNorm-tuning and Prefix-tuning in bf16 (a few hundred
steps on the phantom data, images at each model's size), and a reduced-depth LLaVA-7B-width model
(llava-med-7b's widths with 4 vision and 4 LLM layers) with NF4 + LoRA + gradient checkpointing; prints per
run samples/s, the peak memory (torch.cuda.max_memory_allocated) beside `peftmed plan`'s estimate, and the
loss curve's first and last values. Nothing is downloaded: the models are randomly initialised.

    python benchmarks/e2e/gpu_e2e.py [--steps 200] [--only miss-base/lora] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

RUNS = {
    # name: (backbone, recipe, batch size, extra builder options, memory options, steps factor)
    "miss-base/lora": ("miss-base", "*=lora(r=8)", 16, {}, {}, 1.0),
    "miss-base/layernorm": ("miss-base", "*=layernorm", 16, {}, {}, 1.0),
    "miss-base/prefix": ("miss-base", "fusion=prefix(n=10) decoder=prefix(n=10)", 16, {}, {}, 1.0),
    "blip-base/lora": ("blip-vqa-base", "*=lora(r=8)", 16, {}, {}, 1.0),
    "blip-base/layernorm": ("blip-vqa-base", "*=layernorm", 16, {}, {}, 1.0),
    "blip-base/prefix": ("blip-vqa-base", "fusion=prefix(n=10) decoder=prefix(n=10)", 16, {}, {}, 1.0),
    "llava-7b-width-d4/nf4-lora-ckpt": ("llava-med-7b", "llm=lora(r=16)", 4, {"vision_layers": 4, "text_layers": 4},
                                        {"quantize": "nf4", "grad_checkpoint": "vision,llm"}, 0.25),
}


def _records(image_size: int, n_images: int = 200):
    from peftmed.data import load_records

    return load_records("phantom", "train", n_images=n_images, image_size=image_size)


def run_one(name: str, steps: int, device: str) -> dict:
    import torch

    import peftmed
    from peftmed.memory import prepare
    from peftmed.memory.plan import plan_memory
    from peftmed.tasks import resolve_task
    from peftmed.train import TrainConfig, Trainer

    backbone_name, recipe, batch, options, memory, factor = RUNS[name]
    registry = peftmed.build_registry()
    backbone = registry.backbone(backbone_name)
    task = resolve_task(registry, "vqa", registry.get("dataset", "phantom"))
    with torch.device("meta"):
        size = int(backbone.build(**options).image_size)
    records = _records(size)
    texts = task.texts(records)
    torch.manual_seed(0)
    dev = torch.device(device)
    from peftmed.run.model import accepts as _accepts

    with dev:
        model = backbone.build(texts=texts, **options) if _accepts(backbone.builder, "texts") else backbone.build(**options)
    pm = peftmed.apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
    prepare(pm, base_dtype="bf16", device=dev, **memory)
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n_steps = max(10, int(steps * factor))
    config = TrainConfig(steps=n_steps, batch_size=batch, lr=1e-3, method_lr=True, warmup_steps=10, progress=False,
                         log_every=10_000, device=device, seed=0)
    t0 = time.perf_counter()
    result = Trainer(task.wrap(pm), task.dataset(records, size), config, collate_fn=task.collate).train()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del pm, model
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    plan = plan_memory(backbone_name, recipe, batch_size=batch, seq_len=16, answer_len=8, base_dtype="bf16",
                       backbone_options=options, device=device, **memory)
    return {"run": name, "steps": n_steps, "batch": batch, "samples_per_s": result.samples_per_second,
            "wall_s": wall, "peak_gb": peak / 1024**3 if peak else None, "plan_gb": plan.total / 1024**3,
            "loss_first": result.losses[0], "loss_last": result.losses[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--only", action="append", choices=list(RUNS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import peftmed

    print(f"peftmed {peftmed.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
    from peftmed.errors import ConfigError
    from peftmed.memory.quantize import _bitsandbytes

    try:
        _bitsandbytes()
        has_bnb = True
    except ConfigError:
        has_bnb = False
    rows = []
    print(f"{'run':<34} {'steps':>5} {'samples/s':>10} {'peak GB':>8} {'plan GB':>8} {'error':>7} {'loss first -> last':>20}")
    for name in args.only or RUNS:
        if RUNS[name][4].get("quantize") and not has_bnb:
            print(f"{name:<34} not run: bitsandbytes is not installed here (carry its wheel; see gpu_e2e.sh)")
            continue
        try:
            row = run_one(name, args.steps, args.device)
        except Exception as exc:  # one failed run must not hide the others' figures
            print(f"{name:<34} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(row)
        err = f"{100 * (row['plan_gb'] - row['peak_gb']) / row['peak_gb']:+.1f}%" if row["peak_gb"] else "-"
        peak = f"{row['peak_gb']:.2f}" if row["peak_gb"] else "-"
        print(f"{name:<34} {row['steps']:>5} {row['samples_per_s']:>10.1f} {peak:>8} {row['plan_gb']:>8.2f} {err:>7} "
              f"{row['loss_first']:>9.3f} -> {row['loss_last']:<8.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
