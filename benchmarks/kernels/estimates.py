"""Bytes, FLOPs and launches of each GPU target's providers, and the time they imply on an H100 (a roofline:
each launch costs max(FLOPs / peak, bytes / bandwidth) plus a launch), counted from the kernels' code
paths, not measured. What a GPU run replaces with figures (benchmarks/gpu_check.sh).

    python benchmarks/kernels/estimates.py                       # H100: 790 TFLOP/s bf16, 3.0 TB/s copy
    python benchmarks/kernels/estimates.py --tflops 790 --tbps 4.3   # H200's copy bandwidth

The default peaks are measured figures (~790 TFLOP/s on a bf16 8192^3 GEMM; ~3.0 TB/s H100 / ~4.3 TB/s H200
device copy counting read + write); a launch is taken as 4 us.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Launch:
    what: str
    flops: float
    bytes: float
    ours_gemm: bool = False  # a GEMM of peftmed's own (runs at a fraction of cuBLAS's rate: --gemm-efficiency)


def lora(t=8192, k=4096, n=4096, r=16, e=2, splits=132) -> dict[str, list[Launch]]:
    """y = x W^T + s (x A^T) B^T forward, dx / dA / dB backward (W frozen), bf16 (e bytes)."""
    gemm = 2 * t * k * n
    base = [Launch("y = x W^T (cuBLAS)", gemm, e * (t * k + n * k + t * n)),
            Launch("dx = dy W (cuBLAS)", gemm, e * (t * n + n * k + t * k))]
    part = 4 * splits * r
    ours = [Launch("xa = x A^T (_down_kernel)", 2 * t * k * r, e * (t * k + r * k + t * r)),
            Launch("y = x W^T + b + s xa B^T (_gemm_lora_kernel)", gemm + 2 * t * r * n,
                   e * (t * k + n * k + t * n + t * r + n * r), True),
            # one pass over dy: gs and dB's partials (one program per SM, 132 on an H100: one read-modify-write of each slice)
            Launch("gs = s dy B and dB partials = dy^T xa (_gs_db_kernel)", 4 * t * n * r,
                   e * (t * n + n * r + 2 * t * r) + 3 * part * n),
            Launch("dB = s sum of partials (_reduce_kernel)", 0, part * n + e * r * n),
            Launch("dx = dy W + gs A (_gemm_lora_kernel)", gemm + 2 * t * r * k,
                   e * (t * n + n * k + t * k + t * r + r * k), True),
            Launch("dA partials = gs^T x (_wgrad_kernel)", 2 * t * r * k, e * (t * r + t * k) + part * k),
            Launch("dA = sum of partials (_reduce_kernel)", 0, part * k + e * r * k)]
    # peft's LoRA layer (dropout 0: Identity): base linear, lora_A, lora_B, * scale, + result; and their backward
    peft = base + [Launch("x A^T", 2 * t * k * r, e * (t * k + r * k + t * r)),
                   Launch("(xa) B^T", 2 * t * r * n, e * (t * r + n * r + t * n)),
                   Launch("* scaling", 0, 2 * e * t * n), Launch("y + lora", 0, 3 * e * t * n),
                   Launch("d(scaling): dlora = s dy", 0, 2 * e * t * n),
                   Launch("dxa = dlora B", 2 * t * n * r, e * (t * n + n * r + t * r)),
                   Launch("dB = dlora^T xa", 2 * t * n * r, e * (t * n + t * r + n * r)),
                   Launch("dx_lora = dxa A", 2 * t * r * k, e * (t * r + r * k + t * k)),
                   Launch("dA = dxa^T x", 2 * t * r * k, e * (t * r + t * k + r * k)),
                   Launch("dx = dx_base + dx_lora", 0, 3 * e * t * k)]
    return {"base GEMM pair (cuBLAS)": base, "peftmed triton": ours, "peft LoRA layer": peft}


def lora_persistent(t=8192, k=4096, n=4096, r=16, e=2, splits=132, bm=128, bn=256) -> list[Launch]:
    """The persistent design as built (peftmed/kernels/lora_linear/persistent.py): one TMA-fed persistent GEMM per
    product whose row blocks' first tile computes the rank-r product as an extra r-column tile of its pass over x
    (forward) or dy (backward, adding dy^T xa into dB's fp32 sums with atomics that stay in L2), the other tiles
    adding s L U in their epilogue; dA = gs^T x split over rows as today, the splits adding into fp32 sums with
    atomics (no partials, no reduce); dA and dB cast in one launch each; one memset per direction for the row blocks'
    flags (and the sums)."""
    gemm = 2 * t * k * n
    tiles = (t // bm) * (n // bn)
    small = e * ((t // bm) * k * r + tiles * (r * bn + bm * r))  # D per producer, U and L per tile (L2 mostly)
    return [Launch("flags = 0 (memset)", 0, 4 * (t // bm)),
            Launch("y = x W^T + b + s xa B^T, xa = x A^T as the producer's extra tile (_persistent_kernel)",
                   gemm + 2 * t * k * r + 2 * t * r * n, e * (t * k + n * k + t * n + t * r) + small, True),
            Launch("flags, dA and dB sums = 0 (one memset)", 0, 4 * (t // bm + r * k + n * r)),
            Launch("dx = dy W + gs A, gs = s dy B as the producer's extra tile, dB += dy^T xa (_persistent_kernel)",
                   gemm + 4 * t * n * r + 2 * t * r * k, e * (t * n + n * k + t * k + 2 * t * r) + small, True),
            Launch("dA += gs^T x, row splits adding into fp32 sums in L2 (_wgrad_kernel, ATOMIC)", 2 * t * r * k,
                   e * (t * r + t * k)),
            Launch("dA = sums, cast (one torch.mul)", 0, 4 * r * k + e * r * k),
            Launch("dB = s * sums, cast (one torch.mul)", 0, 4 * n * r + e * n * r)]


def layer_norm_backward(m=32768, n=768, e=2, programs=4 * 132) -> dict[str, list[Launch]]:
    part = 4 * programs * 2 * n
    ours = [Launch("dx, partial dw/db (_bwd_kernel)", 10 * m * n, e * 3 * m * n + 8 * m + e * n + part),
            Launch("dw, db = sum of partials (_reduce_kernel)", 0, part + 2 * e * n)]
    copy = [Launch("copy of the same bytes (x, dy in; dx out)", 0, e * 3 * m * n)]
    return {"copy (the ceiling)": copy, "peftmed triton": ours}


def prefix_attention(b=32, h=12, t=1024, p=64, d=64, e=2) -> dict[str, list[Launch]]:
    """fwd + bwd. A matmul unit is 2 * b * h * t * (t + p) * d FLOPs (one of QK^T, PV, ...)."""
    unit = 2 * b * h * t * (t + p) * d
    qkv = e * b * h * t * d
    pre = e * h * p * d
    lse = 4 * b * h * t
    ours = [Launch("forward: QK^T, PV (_fwd_kernel)", 2 * unit, 4 * qkv + 2 * pre + lse),
            Launch("delta = rowsum(dO O) (_delta_kernel)", 2 * b * h * t * d, 2 * qkv + lse),
            Launch("dk, dv of the sequence: recompute S, dV, dP, dK (_dkdv_kernel)", 4 * unit * t / (t + p),
                   6 * qkv + 2 * lse),
            Launch("dk, dv of the prefix, batch-split partials (_dkdv_kernel)", 4 * unit * p / (t + p),
                   4 * qkv + 2 * lse + 2 * 4 * 66 * pre / e),
            Launch("dprefix_k = sum of partials (_reduce_kernel)", 0, 4 * 66 * pre / e + pre),
            Launch("dprefix_v = sum of partials (_reduce_kernel)", 0, 4 * 66 * pre / e + pre),
            Launch("dq: recompute S, dP, dQ (_dq_kernel)", 3 * unit, 5 * qkv + 2 * pre + 2 * lse)]
    cat = e * b * h * (t + p) * d
    sdpa = [Launch("cat([prefix expanded; k]) and v", 0, 2 * (2 * cat)),
            Launch("SDPA forward (flash)", 2 * unit, 2 * qkv + 2 * cat + lse),
            Launch("SDPA backward (flash: 5 matmul units)", 5 * unit, 4 * qkv + 4 * cat + lse),
            Launch("d(cat): slice dk, dv; sum dprefix over the batch", 0, 2 * cat + 2 * qkv + 2 * pre)]
    return {"sdpa on concat (the baseline)": sdpa, "peftmed triton": ours}


def seconds(launches: list[Launch], tflops: float, tbps: float, launch_us: float, gemm_efficiency: float = 1.0
            ) -> float:
    return sum(max(x.flops / (tflops * 1e12 * (gemm_efficiency if x.ours_gemm else 1.0)), x.bytes / (tbps * 1e12))
               + launch_us * 1e-6 for x in launches)


def show(title: str, providers: dict[str, list[Launch]], args, baseline: str) -> dict[str, float]:
    print(f"\n## {title}")
    times = {}
    for name, launches in providers.items():
        s = seconds(launches, args.tflops, args.tbps, args.launch_us, args.gemm_efficiency)
        times[name] = s
        gb = sum(x.bytes for x in launches) / 1e9
        gf = sum(x.flops for x in launches) / 1e9
        print(f"{name:<32} {len(launches):>2} launches  {gf:>9.1f} GFLOP  {gb:>7.3f} GB  {s * 1e3:>7.3f} ms  "
              f"{s / times[baseline] if baseline in times else 1:.2f}x {baseline}")
        if args.verbose:
            for x in launches:
                print(f"    {x.what:<62} {x.flops / 1e9:>9.2f} GFLOP {x.bytes / 1e6:>9.1f} MB")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=790.0, help="bf16 dense peak measured (TFLOP/s)")
    ap.add_argument("--tbps", type=float, default=3.0, help="device copy bandwidth, read + write (TB/s)")
    ap.add_argument("--launch-us", type=float, default=4.0)
    ap.add_argument("--gemm-efficiency", type=float, default=1.0,
                    help="the rate of peftmed's own GEMM kernels as a fraction of cuBLAS's (default 1: as fast)")
    ap.add_argument("-v", "--verbose", action="store_true", help="every launch")
    args = ap.parse_args()
    print(f"roofline at {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s, {args.launch_us:g} us a launch")
    t = show("LoRA fwd+bwd, 8192 x 4096 -> 4096, r=16, bf16 (target <= 1.10x base, >= 1.3x faster than peft)",
             lora(), args, "base GEMM pair (cuBLAS)")
    print(f"peft / peftmed: {t['peft LoRA layer'] / t['peftmed triton']:.2f}x")
    print("\nLoRA designs x the base GEMM pair, by the rate of peftmed's GEMM kernels against cuBLAS's (target <= 1.10x):")
    print(f"{'GEMM efficiency':>16} {'today (7 launches)':>20} {'persistent (7 launches: 2 memsets, 2 casts)':>44}")
    base = seconds(lora()["base GEMM pair (cuBLAS)"], args.tflops, args.tbps, args.launch_us)
    for eff in (1.0, 0.97, 0.95, 0.9, 0.85, 0.8):
        today = seconds(lora()["peftmed triton"], args.tflops, args.tbps, args.launch_us, eff)
        persistent = seconds(lora_persistent(), args.tflops, args.tbps, args.launch_us, eff)
        print(f"{eff:>16.2f} {today / base:>19.3f}x {persistent / base:>43.3f}x")
    if args.verbose:
        for x in lora_persistent():
            print(f"    {x.what:<104} {x.flops / 1e9:>9.2f} GFLOP {x.bytes / 1e6:>9.1f} MB")
    for n in (768, 1024):
        t = show(f"LayerNorm backward, 32768 x {n}, bf16 (target >= 80% of copy bandwidth)",
                 layer_norm_backward(n=n), args, "copy (the ceiling)")
        print(f"share of copy bandwidth: {100 * t['copy (the ceiling)'] / t['peftmed triton']:.0f}%")
    for p, tt, d in ((10, 35, 64), (64, 256, 64), (64, 1024, 64), (64, 1024, 128)):
        show(f"prefix attention fwd+bwd, B32 H12 P{p} T{tt} D{d}, bf16 (target <= 1.0x SDPA on concat)",
             prefix_attention(t=tt, p=p, d=d), args, "sdpa on concat (the baseline)")


if __name__ == "__main__":
    main()
