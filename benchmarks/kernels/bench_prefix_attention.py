"""prefix_attention forward + backward against attention over the explicitly concatenated [prefix;
sequence] keys/values, in one run; then the training-step memory of Prefix-tuning on ``miss-base``.

    python benchmarks/kernels/bench_prefix_attention.py                   # CPU: op rows + miss-base step
    python benchmarks/kernels/bench_prefix_attention.py --device cuda     # GPU rows, bf16, batch 32
    python benchmarks/kernels/bench_prefix_attention.py --skip-model      # op rows only
    python benchmarks/kernels/bench_prefix_attention.py --skip-ops --batch-model 32   # the target's step (CPU: ~10 min, ~20 GB)

Op rows (self-attention, a (B, Tk) padding mask, H=12, D=64 (and 128 on CUDA); prefix 10 and 64, sequence
35, 256, 1024; GPU targets, bf16: peftmed triton fwd+bwd no slower than SDPA on the concatenation (<= 1.0x) and a
lower peak of allocated memory over the same forward + backward), providers timed interleaved: ``reference (concat + softmax)`` (peftmed.kernels.prefix_attention
.reference.reference: cat + fp32 softmax), ``sdpa on concat`` (peftmed.attention.attend_reference:
cat + torch's scaled_dot_product_attention) and ``peftmed <impl>``. Peak memory of one forward +
backward: on CUDA max_memory_allocated; on CPU the growth of the peak resident set (VmHWM after a
clear_refs reset) of a fresh process per (provider, size) (peftmed.bench.memory.MemoryProbe).

Model step (target: peak lower than the reference path's by at least the per-sample prefix copies the
reference makes): one forward + backward of ``miss-base`` with ``vision=prefix fusion=prefix
decoder=prefix`` (train mode), once with attend() on prefix_attention and once on the concatenation
reference, each in a fresh process. Printed: the peak (resident-set growth, with a fixed mmap threshold
so that freed tensors leave the resident set), the bytes autograd holds for backward (every saved
tensor, once per storage) and the copies, counted from every prefixed attention call of the step
(2 * B * H * P * D * bytes). The default batch is 2 (a quick look); the target's batch 32 takes about
100 s per path and 15 GB on a 2-core CPU (``--skip-ops --batch-model 32``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, percentiles, print_expected, report, row, target, time_interleaved, write_targets  # noqa: E402

MIB = 1024 * 1024
H, D = 12, 64


def inputs(b, t, n, dtype, device, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, H, t, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    pk, pv = (torch.randn(H, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, t - t // 4:] = False  # the last quarter is padding
    mask[0] = True
    return (q, k, v, pk, pv), mask.to(device), torch.randn(b, H, t, d, generator=g).to(device, dtype)


def provider_fn(name, ins, mask):
    from peftmed.attention import attend_reference
    from peftmed.kernels.prefix_attention.op import prefix_attention
    from peftmed.kernels.prefix_attention.reference import reference

    q, k, v, pk, pv = ins
    if name == "reference (concat + softmax)":
        return lambda: reference(q, k, v, pk, pv, mask[:, None, None, :])
    if name == "sdpa on concat":
        return lambda: attend_reference(q, k, v, prefix=(pk, pv), attn_mask=mask)
    impl = name.split()[-1]
    return lambda: prefix_attention(q, k, v, pk, pv, mask, impl=impl)


def step(fn, ins, dout):
    def run():
        torch.autograd.grad(fn(), ins, dout)

    return run


def op_peak_mib(name, b, t, n, dtype, device) -> float:
    """Peak memory of one forward + backward of ``name`` (run in this process)."""
    from peftmed.bench.memory import MemoryProbe

    ins, mask, dout = inputs(b, t, n, dtype, device)
    run = step(provider_fn(name, ins, mask), ins, dout)
    run()  # warm-up: code pages and thread pools loaded on first use must not count
    probe = MemoryProbe(torch.device(device))
    probe.start()
    run()
    return probe.peak_mib()


def isolated(args_list) -> dict:
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed,
    # so the resident-set peak follows the tensors alive rather than what the heap kept
    env = dict(os.environ, HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        return {"failed": out.stderr.strip()[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _op_targets(args, n: int, t: int, d: int) -> tuple[tuple[str, str], tuple[str, str]]:
    shape = f"B{args.batch_op} H{H} P{n} T{t} D{d} bf16"
    return ((f"prefix attention fwd+bwd triton / SDPA on concat, {shape}", "<= 1.0x"),
            (f"prefix attention peak memory triton / SDPA on concat, {shape}", "< 1.0x"))


def _shapes(args, gpu: bool) -> list[tuple[int, int, int]]:
    return [(n, t, d) for d in (args.head_dims or ([64, 128] if gpu else [D])) for n in args.prefix for t in args.seq]


def op_rows(args) -> list[dict]:
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    impls = args.impls or (["triton", "cuda", "torch"] if gpu else ["torch"])
    rows = []
    for n, t, d in _shapes(args, gpu):
        if True:
            ins, mask, dout = inputs(args.batch_op, t, n, dtype, args.device, d=d)
            names = ["reference (concat + softmax)", "sdpa on concat"]
            fns = {nm: step(provider_fn(nm, ins, mask), ins, dout) for nm in names}
            for impl in impls:
                nm = f"peftmed {impl}"
                try:
                    fns[nm] = step(provider_fn(nm, ins, mask), ins, dout)
                    fns[nm]()
                except Exception as exc:  # an implementation that cannot run here is reported, not fatal
                    print(f"skipping {nm}: {exc}", file=sys.stderr)
                    fns.pop(nm)
            rounds = args.rounds if t < 1024 else max(3, args.rounds // 4)
            times = time_interleaved(fns, device=args.device, rounds=rounds, warmup=2)
            base = percentiles(times["sdpa on concat"])[1]
            peaks = {}
            for nm, samples in times.items():
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    fns[nm]()
                    peak = (torch.cuda.max_memory_allocated() - before) / MIB
                else:
                    res = isolated(["--one-op", nm, str(args.batch_op), str(t), str(n)])
                    peak = res.get("peak_mib", float("nan"))
                peaks[nm] = peak
                shape = f"B{args.batch_op} H{H} P{n} T{t} D{d}"
                rows.append(row(shape, dtype, "fwd+bwd", nm, samples, args.device, f"peak {peak:.1f} MiB",
                                None if nm == "sdpa on concat" else base))
            if gpu and "peftmed triton" in times:
                ratio = percentiles(times["peftmed triton"])[1] / base
                (time_name, time_goal), (mem_name, mem_goal) = _op_targets(args, n, t, d)
                target(time_name, ratio, time_goal, ratio <= 1.0, "x")
                if peaks.get("sdpa on concat"):  # the allocator's own peak over one forward + backward
                    mem = peaks["peftmed triton"] / peaks["sdpa on concat"]
                    target(mem_name, mem, mem_goal, mem < 1.0, "x")
    return rows


# ---- the miss-base training step ----------------------------------------------------------------------
def model_step(path: str, size: str, batch: int, recipe: str) -> dict:
    """One Prefix-tuning training step of miss-<size> in this process, attend() on ``path``."""
    import functools

    import peftmed
    from peftmed.attention import attend
    from peftmed.backbones.miss import layers
    from peftmed.bench.memory import MemoryProbe

    torch.manual_seed(0)
    shape = peftmed.build_backbone(f"miss-{size}", device="meta")
    data = shape.example_batch(batch)
    copies = []

    def counting_attend(q, k, v, *, prefix=None, **kw):
        if prefix is not None and prefix[0].shape[-2] > 0:  # what attend_reference repeats per sample
            copies.append(2 * k.shape[0] * prefix[0].numel() * k.element_size())
        return attend(q, k, v, prefix=prefix, impl="reference" if path == "reference" else None, **kw)

    layers.attend = functools.partial(counting_attend)  # this process only: the switch under test
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    model = peftmed.apply(peftmed.build_backbone(f"miss-{size}", tokenizer=shape.tokenizer), recipe)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t):  # every tensor autograd keeps for backward, counted once per storage
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            held[ptr] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.compute_loss(data)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"path": path, "batch": batch, "peak_mib": probe.peak_mib(), "method": probe.method,
            "saved_mib": sum(held.values()) / MIB, "copies_mib": sum(copies) / MIB, "calls": len(copies),
            "seconds": seconds}


def model_rows(args) -> None:
    print(f"\nPrefix-tuning training step, miss-{args.size}, recipe '{args.recipe}', batch {args.batch_model}, "
          "CPU (one forward + backward, fresh process per path)")
    res = {p: isolated(["--one-model", p, args.size, str(args.batch_model), args.recipe])
           for p in ("reference", "prefix_attention")}
    for p, r in res.items():
        if "failed" in r:
            print(f"  {p}: failed: {r['failed']}")
            return
        print(f"  attend on {p:<17} peak {r['peak_mib']:8.0f} MiB   held for backward {r['saved_mib']:8.1f} MiB"
              f"   step {r['seconds']:6.1f} s")
    ref, ours = res["reference"], res["prefix_attention"]
    saved = ref["peak_mib"] - ours["peak_mib"]
    copies = ref["copies_mib"]
    print(f"  peak lower by {saved:.0f} MiB; held-for-backward lower by {ref['saved_mib'] - ours['saved_mib']:.1f} MiB; "
          f"the reference's per-sample prefix copies: {copies:.1f} MiB ({ref['calls']} prefixed attention calls) "
          f"-> target {'met' if saved >= copies else 'NOT met'}")
    if args.batch_model != 32:
        print(f"  at batch 32 the reference's prefix copies are {copies * 32 / args.batch_model:.0f} MiB "
              f"(2 * B * H * P * D * bytes per call: linear in the batch); --batch-model 32 measures it")
    print(f"  peak memory method: {ref['method']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prefix", type=int, nargs="+", default=[10, 64])
    ap.add_argument("--seq", type=int, nargs="+", default=[35, 256, 1024])
    ap.add_argument("--batch-op", type=int, help="op rows' batch (default 4 on CPU, 32 on CUDA)")
    ap.add_argument("--impls", nargs="+")
    ap.add_argument("--head-dims", type=int, nargs="+", help="default 64 on CPU, 64 and 128 on CUDA")
    ap.add_argument("--targets-json", type=Path, help="append the targets' figures here (JSON list)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-ops", action="store_true", help="only the model step")
    ap.add_argument("--size", default="base", choices=["tiny", "base"])
    ap.add_argument("--batch-model", type=int, default=2, help="model step batch (the target is at 32: ~100 s per path on 2 cores)")
    ap.add_argument("--recipe", default="vision=prefix fusion=prefix decoder=prefix")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "kernels")
    ap.add_argument("--list-targets", action="store_true", help="print the targets these arguments record, run nothing")
    ap.add_argument("--one-op", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--one-model", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_op:
        nm, b, t, n = args.one_op
        print(json.dumps({"peak_mib": op_peak_mib(nm, int(b), int(t), int(n), torch.float32, "cpu")}))
        return
    if args.one_model:
        path, size, b, recipe = args.one_model
        print(json.dumps(model_step(path, size, int(b), recipe)))
        return
    gpu = args.device == "cuda"
    args.batch_op = args.batch_op or (32 if gpu else 4)
    if args.list_targets:  # the op rows' targets are the GPU's (the model step prints its own comparison)
        print_expected([x for s in _shapes(args, gpu) for x in _op_targets(args, *s)] if gpu and not args.skip_ops
                       else [])
        return
    if not gpu:
        print("No GPU here: CPU rows only (fp32). GPU rows: --device cuda.")
    if not args.skip_ops:
        report("prefix_attention", op_rows(args), args.out)
        write_targets(args.targets_json)
    if not args.skip_model:
        model_rows(args)


if __name__ == "__main__":
    main()
