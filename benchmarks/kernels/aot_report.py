"""Compile every Triton kernel ahead of time for sm_90 (and sm_80) on this machine, no GPU needed, and print
registers, spills, shared memory and the tensor-core path of each launch the launchers make at the target shapes
(LoRA 8192x4096->4096 and 560x768->768 at each rank block; LayerNorm 32768 x 768/1024 and the widest Triton row;
prefix attention B32 H12 D64/128, prefix 10 and 64, sequence 35 and 1024), compiled with the specialisation
Triton's JIT gives those launches. Under another Triton (the GPU machine's): put it first on PYTHONPATH.

    python benchmarks/kernels/aot_report.py                # sm_90 and sm_80
    python benchmarks/kernels/aot_report.py --arch 90 --json aot.json
    python benchmarks/kernels/aot_report.py --search-prefix   # re-derive prefix_attention's GPU_TILES (~3 min)

Exit status 1 when a configuration spills or needs more shared memory than the target gives a block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", help="compute capability (default: 90 and 80)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--search-prefix", action="store_true",
                   help="print the largest spill-free prefix-attention tiles per (head dim, element size, kernel)")
    args = p.parse_args()
    from peftmed.kernels import aot
    from peftmed.kernels.plugin import aot_cases
    from peftmed.kernels.prefix_attention import impls as prefix_impls

    if args.search_prefix:
        for key, tiles in sorted(prefix_impls.search_tiles(args.arch or (90, 80), args.workers).items()):
            print(f"{key}: {tiles}  # (BLOCK_M, BLOCK_N, num_warps, num_stages); None: no tile fits")
        return 0

    t0 = time.perf_counter()
    rows = aot.report(aot_cases(), args.arch or (90, 80), workers=args.workers)
    head = (f"{'op':<17} {'kernel':<18} {'configuration':<52} {'arch':<6} {'warps':>5} {'regs':>5} {'spill B':>8} "
            f"{'smem KB':>8} {'limit':>6} {'mma':<6} ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<17} {r['kernel']:<18} {r['config'][:52]:<52} {r['arch']:<6} {r['warps']:>5} {r['registers']:>5} "
              f"{r['spill_stores'] + r['spill_loads']:>8} {r['shared'] / 1024:>8.1f} {r['shared_limit'] // 1024:>6} "
              f"{r['mma'] + ('*' if r['serialized_wgmma'] else ''):<6} {'yes' if r['ok'] else 'NO'}")
    bad = [r for r in rows if not r["ok"]]
    import triton

    print(f"triton {triton.__version__}: {len(rows)} configurations compiled in {time.perf_counter() - t0:.0f} s; {len(bad)} spill or exceed shared "
          f"memory (* = ptxas serialises wgmma for lack of registers)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
