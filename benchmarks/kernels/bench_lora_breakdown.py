"""Where LoRA's time goes on a GPU: each Triton kernel of one forward + backward at the target shape, beside what it
should cost (a cuBLAS GEMM of the same shape for the two GEMM kernels, a device copy of the bytes it must read for
the memory-bound ones), then a small sweep of the main GEMM's tiles against the launcher's choice and cuBLAS.

    python benchmarks/kernels/bench_lora_breakdown.py              # 8192 x 4096 -> 4096, r=16, bf16 (needs CUDA)
    python benchmarks/kernels/bench_lora_breakdown.py --dry-run    # the rows it would time, on any machine
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_lora_breakdown.py --device cpu --tokens 32 --features 64 \
        --rank 4 --rounds 2                                        # the same code paths on a CPU (a smoke test)

Each row: p50 milliseconds over interleaved rounds (L2 flushed before each call), the baseline's, their ratio, and
the kernel's achieved TFLOP/s or TB/s. Run by benchmarks/gpu_check.sh (step 3), so the first GPU run shows which
kernel keeps LoRA above the base GEMM pair (benchmarks/kernels/estimates.py predicts 1.18x for today's kernels and
1.04x for the persistent design at cuBLAS's GEMM rate), and the whole step of each design against the cuBLAS pair.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (what, kernel, baseline): the rows, in the order one training step launches them
ROWS = (
    ("xa = dropout(x) A^T", "_down_kernel", "copy of x"),
    ("y = x W^T + b + s xa B^T", "_gemm_lora_kernel", "cuBLAS x W^T"),
    ("gs = s dy B and dB partials", "_gs_db_kernel", "copy of dy"),
    ("dB = sum of partials", "_reduce_kernel", "copy of the partials"),
    ("dx = dy W + gs A", "_gemm_lora_kernel", "cuBLAS dy W"),
    ("dA partials = gs^T dropout(x)", "_wgrad_kernel", "copy of x"),
    # the persistent design (persistent.py): xa in the same pass as y; gs and dB in the same pass as dx (dropout 0)
    ("y and xa, persistent", "_persistent_kernel fwd", "cuBLAS x W^T"),
    ("dx, gs and dB, persistent", "_persistent_kernel dx", "cuBLAS dy W"),
)
# whole forward + backward (W frozen): today's kernels, the persistent design, and the cuBLAS pair alone
STEPS = ("today's kernels fwd+bwd", "persistent fwd+bwd", "cuBLAS pair")
# the main GEMM's tiles tried: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
SWEEP = ((128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
         (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 4, 5))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--features", type=int, default=4096, help="in = out features")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the kernels under TRITON_INTERPRET=1 (tiny shapes only)")
    ap.add_argument("--dry-run", action="store_true", help="print the rows it would time and stop")
    args = ap.parse_args(argv)
    t, d, r = args.tokens, args.features, args.rank
    print(f"LoRA breakdown at {t}x{d}->{d} r={r} bf16, dropout {args.dropout}")
    if args.dry_run:
        for what, kernel, base in ROWS:
            print(f"  {kernel:<18} {what:<32} vs {base}")
        print(f"  whole step: {', '.join(STEPS)}")
        print(f"  tile sweep of _gemm_lora_kernel: {len(SWEEP)} tiles (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, "
              f"stages) vs the launcher's and cuBLAS")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (--dry-run lists the rows)")
        return 0
    from common import percentiles, time_interleaved

    from peftmed.kernels.lora_linear import persistent as pk
    from peftmed.kernels.lora_linear import triton_impl as k
    from peftmed.kernels.triton_reduce import reduce_partials

    torch.manual_seed(0)
    dev, dt, p, seed, s = args.device, torch.bfloat16, args.dropout, 1, 2.0
    x, dy = torch.randn(t, d, device=dev, dtype=dt), torch.randn(t, d, device=dev, dtype=dt)
    w, bias = torch.randn(d, d, device=dev, dtype=dt) * 0.02, torch.zeros(d, device=dev, dtype=dt)
    a, b = torch.randn(r, d, device=dev, dtype=dt) * 0.02, torch.randn(d, r, device=dev, dtype=dt) * 0.02
    xa = k._down(x, (a.stride(0), a.stride(1)), a, r, 1.0, p, seed, dt)
    gs, _ = k._gs_db(dy, b, xa, s, torch.empty_like(b))
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else None
    part = torch.randn(sms or 2, d, r, device=dev, dtype=torch.float32)
    sink = torch.empty(t, d, device=dev, dtype=dt)
    psink = torch.empty_like(part)

    def up(src, wt, wt_strides, n, bias_, lo, hi, hi_strides, alpha, drop):
        return lambda: k._gemm_lora(src, wt, wt_strides, n, bias_, lo, hi, hi_strides, alpha, drop, seed)

    fns = {
        "_down_kernel": lambda: k._down(x, (a.stride(0), a.stride(1)), a, r, 1.0, p, seed, dt),
        "copy of x": lambda: sink.copy_(x),
        "_gemm_lora_kernel fwd": up(x, w, (w.stride(1), w.stride(0)), d, bias, xa, b, (b.stride(1), b.stride(0)), s,
                                    0.0),
        "cuBLAS x W^T": lambda: torch.mm(x, w.t(), out=sink),
        "_gs_db_kernel": lambda: k._gs_db(dy, b, xa, s, torch.empty_like(b)),
        "copy of dy": lambda: sink.copy_(dy),
        "_reduce_kernel": lambda: reduce_partials(part, torch.empty_like(b), s, transpose=False),
        "copy of the partials": lambda: psink.copy_(part),
        "_gemm_lora_kernel dx": up(dy, w, (w.stride(0), w.stride(1)), d, None, gs, a, (a.stride(0), a.stride(1)),
                                   1.0, p),
        "cuBLAS dy W": lambda: torch.mm(dy, w, out=sink),
        "_wgrad_kernel": lambda: k._wgrad(gs, x, p, seed, torch.empty_like(a)),
        "_persistent_kernel fwd": lambda: pk._product(x, w, False, d, bias, a, (a.stride(1), a.stride(0)), b,
                                                      (b.stride(1), b.stride(0)), torch.empty_like(xa), s, 1.0, p, seed),
        "_persistent_kernel dx": lambda: pk._product(dy, w, True, d, None, b, (b.stride(0), b.stride(1)), a,
                                                     (a.stride(0), a.stride(1)), torch.empty_like(gs), 1.0, s, 0.0,
                                                     seed, xa=xa, db=torch.zeros(d, r, device=dev)),
        "today's kernels fwd+bwd": lambda: k.backward(dy, x, w, a, b, k.forward(x, w, None, a, b, s, 0.0, seed)[1], s,
                                                      0.0, seed, (True, False, False, True, True)),
        "persistent fwd+bwd": lambda: pk.backward(dy, x, w, a, b, pk.forward(x, w, None, a, b, s, 0.0, seed)[1], s,
                                                  0.0, seed, (True, False, False, True, True)),
        "cuBLAS pair": lambda: (torch.mm(x, w.t(), out=sink), torch.mm(dy, w, out=sink)),
    }
    times = {name: percentiles(v)[1] for name, v in time_interleaved(fns, device=dev, rounds=args.rounds).items()}
    gemm_flops = 2 * t * d * d
    print(f"{'kernel':<24} {'does':<32} {'ms':>7} {'baseline':<22} {'ms':>7} {'x':>6}  achieved")
    for (what, kernel, base), name in zip(ROWS, ("_down_kernel", "_gemm_lora_kernel fwd", "_gs_db_kernel",
                                                 "_reduce_kernel", "_gemm_lora_kernel dx", "_wgrad_kernel",
                                                 "_persistent_kernel fwd", "_persistent_kernel dx")):
        ms, base_ms = times[name], times[base]
        if base.startswith("cuBLAS"):
            rate = f"{gemm_flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s"
        else:
            read = {"copy of x": x, "copy of dy": dy, "copy of the partials": part}[base]
            rate = f"{read.numel() * read.element_size() / (ms * 1e-3) / 1e12:.2f} TB/s read"
        print(f"{name:<24} {what:<32} {ms:>7.3f} {base:<22} {base_ms:>7.3f} {ms / base_ms:>6.2f}  {rate}")

    print(f"\nwhole step at dropout 0 (W frozen; x, A, B trained), against the cuBLAS pair {times['cuBLAS pair']:.3f} ms:")
    for name in STEPS[:2]:
        print(f"  {name:<26} {times[name]:>7.3f} ms  {times[name] / times['cuBLAS pair']:.2f}x")

    sweep = {}
    for tile in SWEEP:
        bm, bn, bk, group, warps, stages = tile
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
        run = up(x, w, (w.stride(1), w.stride(0)), d, bias, xa, b, (b.stride(1), b.stride(0)), s, 0.0)
        with mock.patch.object(k, "gemm_config", lambda *_a, _c=cfg, **_k: dict(_c)):
            try:
                run()
                if dev == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # a tile that does not fit (shared memory) is reported, not fatal
                print(f"  tile {tile}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            sweep[tile] = percentiles(time_interleaved({"t": run}, device=dev, rounds=args.rounds)["t"])[1]
    chosen = k.gemm_config(dt, dev == "cuda", k._block_r(r), t, d, sms)
    print(f"\ntile sweep of _gemm_lora_kernel (forward), the launcher's: {chosen}; cuBLAS {times['cuBLAS x W^T']:.3f} ms")
    for tile, ms in sorted(sweep.items(), key=lambda kv: kv[1]):
        print(f"  {str(tile):<30} {ms:>7.3f} ms  {ms / times['cuBLAS x W^T']:.2f}x cuBLAS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
