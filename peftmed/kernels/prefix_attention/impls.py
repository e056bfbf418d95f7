"""prefix_attention's implementations, their limits, its AOT cases and the search behind its Triton tiles (its
compiled extension: ``extensions.py``).

One program / block holds a (BLOCK, D) tile of q, k and v: at D = 256 the Triton kernels need 237-280 KB of shared
memory (an H100 gives a block 227 KB), so the dispatcher sends larger heads elsewhere; the CUDA kernel keeps 8 values
per lane (32 x 8). fp32 on a GPU (three TF32 passes per product) spills at every tile above head dim 64
(``benchmarks/kernels/aot_report.py``): it goes to the CUDA kernel or torch. On the CPU, torch's implementation calls
torch's flash kernels per branch, so it is also the fast CPU path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from ..aot import DTYPE_NAMES, AotCase, compile_case, labelled, meta, recorded_launches
from ..builtin import cuda_kernel, fp32_on_gpu_at_most, size_at_most, torch_kernel, triton_kernel
from ..registry import KernelCall, KernelImpl, refusal

OP = "prefix_attention"
MAX_HEAD_DIM = {"triton": 128, "cuda": 256}
TRITON_FP32_MAX_HEAD_DIM = 64
TRITON_LIMITS = (size_at_most(MAX_HEAD_DIM["triton"], "head dim", "Triton kernel's"),
                 fp32_on_gpu_at_most(TRITON_FP32_MAX_HEAD_DIM, "head dim", "Triton kernel's", MAX_HEAD_DIM["triton"]))


def impls() -> list[KernelImpl]:
    return [
        torch_kernel(OP, "PyTorch: CPU flash kernels (one call over a transient concatenation up to 160 keys, else per "
                         "branch merged in place), matmuls elsewhere or with dropout"),
        cuda_kernel(OP, (size_at_most(MAX_HEAD_DIM["cuda"], "head dim", "CUDA kernel's"),)),
        triton_kernel(OP, TRITON_LIMITS),
    ]


SHAPES = ((10, 35), (64, 1024))  # (prefix length, sequence length): the targets' extremes, B32 H12


def aot_cases(head_dims: Iterable[int] = (64, 128), dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float32),
              tiles: dict[str, dict] | None = None) -> list[AotCase]:
    """Forward and backward at B32 H12 with a (B, Tk) padding mask, causality and dropout all on and all off, at the
    targets' shortest and longest prefix and sequence. ``tiles`` replaces the launchers' (a search)."""
    from unittest import mock

    from . import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    b, h = 32, 12
    for d in head_dims:
        for dtype in dtypes:
            if tiles is None and refusal(TRITON_LIMITS, KernelCall("cuda", dtype, d)):
                continue  # not the dispatcher's to choose
            for n, tq in SHAPES:
                q = meta(b, h, tq, d, dtype=dtype)
                pk = meta(h, n, d, dtype=dtype)
                for full in (False, True):
                    mask = meta(b, 1, 1, tq, dtype=torch.bool) if full else None
                    p = 0.1 if full else 0.0
                    tag = f"{DTYPE_NAMES[dtype]} D={d} P{n} T{tq} {'mask+causal+dropout' if full else 'plain'}"
                    # as on each target: Hopper takes its own tiles where SM90_TILES has them
                    for cap, arches in (((9, 0), (90,)), ((8, 0), (80,))):
                        patch = mock.patch.object(t, "config", lambda *a, **k: tiles) if tiles else \
                            contextlib.nullcontext()
                        with patch, recorded_launches(capability=cap) as launches:
                            o, lse = t.forward(q, q, q, pk, pk, mask, full, None, p, 1)
                            t.backward(q, q, q, q, pk, pk, mask, full, None, p, 1, o, lse)
                        out += labelled(OP, launches, tag, seen, arches=arches)
    return out


# ---- the tile search behind triton_impl.GPU_TILES ------------------------------------------------------------
CANDIDATES = ((128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2),
              (32, 32, 8, 2), (32, 32, 8, 1), (32, 32, 4, 2), (32, 16, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1))


def search_tiles(arches: Iterable[int] = (90, 80), workers: int = 2) -> dict:
    """For each (head dim, element size) and kernel, the first of ``CANDIDATES`` (largest first) that compiles with
    no spill and within shared memory on every arch with every feature set: what ``triton_impl.GPU_TILES`` holds."""
    from concurrent.futures import ThreadPoolExecutor

    from . import triton_impl as t  # deferred: imports triton

    names = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}

    def one(group):
        d, dtype, which = group
        for bm, bn, w, st in CANDIDATES:
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, num_warps=w, num_stages=st)
            sel = [c for c in aot_cases((d,), (dtype,), {k: tile for k in t.KERNELS}) if c.name == names[which]]
            if all(compile_case(c, a)["ok"] for a in arches for c in sel if c.arches is None or a in c.arches):
                return group, (bm, bn, w, st)
        return group, None

    groups = [(d, dtype, which) for d in (64, 128) for dtype in (torch.bfloat16, torch.float32) for which in t.KERNELS]
    with ThreadPoolExecutor(workers) as pool:
        found = dict(pool.map(one, groups))
    table: dict = {}
    for (d, dtype, which), tile in found.items():
        table.setdefault((d, dtype.itemsize), {})[which] = tile
    return table
