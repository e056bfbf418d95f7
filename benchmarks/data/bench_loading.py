"""Data loading speed: items/s of a plain full decode + resize per item (the baseline), without a cache, on the first pass
(decode once per image), from the disk cache (a new run) and from memory (every later epoch), beside
the time of one training step of a small model on a batch of the same size.

    python benchmarks/data/bench_loading.py                       # VQA-RAD from ../shared/data/vqa_rad
    python benchmarks/data/bench_loading.py --dataset phantom     # generated, nothing to download
    python benchmarks/data/bench_loading.py --data-dir PATH --image-size 480 --backbone none
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peftmed.data import VQADataset, collate, load_records

DEFAULT_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa_rad"


def items_per_s(ds: VQADataset, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)


def naive_items_per_s(records, size: int, n: int) -> float:
    """What a loader without peftmed's data layer does: full decode and resize of every item."""
    from PIL import Image

    start = time.perf_counter()
    for rec in records[:n]:
        img = Image.open(rec.image) if not callable(rec.image) else rec.image()
        torch.from_numpy(np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)).copy())
    return n / (time.perf_counter() - start)


def train_step_ms(backbone: str, batch: dict, repeats: int = 3) -> float:
    import peftmed

    model = peftmed.build_backbone(backbone)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(repeats + 1):  # the first step warms up allocations and is not counted
        start = time.perf_counter()
        loss = model.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help="vqa-rad (default when its folder exists) or phantom")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="train")
    ap.add_argument("--image-size", type=int, default=64, help="resize side (miss-tiny takes 64)")
    ap.add_argument("--items", type=int, default=600, help="items timed per pass")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="miss-tiny", help="model whose training step is the yardstick; 'none' skips")
    args = ap.parse_args()

    dataset, data_dir = args.dataset, args.data_dir
    if dataset is None:
        dataset = "vqa-rad" if (data_dir or DEFAULT_VQA_RAD.is_dir()) else "phantom"
    if dataset == "vqa-rad" and data_dir is None:
        data_dir = DEFAULT_VQA_RAD
    records = load_records(dataset, args.split, data_dir=data_dir)
    n = min(args.items, len(records))
    images = len({r.image_id for r in records[:n]})
    print(f"dataset {dataset}/{args.split}: timing {n} items ({images} distinct images) at {args.image_size} px, "
          f"{torch.get_num_threads()} torch threads")

    naive = naive_items_per_s(records, args.image_size, n)
    uncached = items_per_s(VQADataset(records, args.image_size, cache=False), n)
    with tempfile.TemporaryDirectory() as tmp:
        first = VQADataset(records, args.image_size, cache_dir=tmp)
        cold = items_per_s(first, n)
        warm = items_per_s(first, n)
        disk = items_per_s(VQADataset(records, args.image_size, cache_dir=tmp), n)
    print(f"  baseline: full decode + resize per item: {naive:10.0f} items/s")
    print(f"  no cache (reduced-scale JPEG decode)    : {uncached:10.0f} items/s  ({uncached / naive:.1f}x)")
    print(f"  first pass (decode once per image)      : {cold:10.0f} items/s  ({cold / naive:.1f}x)")
    print(f"  new run, disk cache                     : {disk:10.0f} items/s  ({disk / naive:.1f}x)")
    print(f"  later epochs, memory cache              : {warm:10.0f} items/s  ({warm / naive:.0f}x)")

    ds = VQADataset(records, args.image_size)
    ds.warm()
    bs = min(args.batch_size, len(ds))
    start = time.perf_counter()
    rounds = max(1, n // bs)
    for k in range(rounds):
        batch = collate([ds[(k * bs + i) % len(ds)] for i in range(bs)])
    load_ms = 1000 * (time.perf_counter() - start) / rounds
    uncached_ms = 1000 * bs / naive
    print(f"  batch of {bs}: cached load + collate {load_ms:.2f} ms, baseline decode {uncached_ms:.1f} ms")
    if args.backbone != "none":
        step = train_step_ms(args.backbone, batch)
        print(f"  {args.backbone} training step (forward + backward + AdamW) on that batch: {step:.1f} ms "
              f"-> cached loading is {100 * load_ms / step:.3f}% of a step (baseline decode: {100 * uncached_ms / step:.0f}%)")


if __name__ == "__main__":
    main()
