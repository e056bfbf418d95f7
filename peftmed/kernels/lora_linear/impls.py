"""lora_linear's implementations, their limits and its AOT cases (its compiled extensions: ``extensions.py``).

The Triton kernels take ranks up to ``TRITON_MAX_RANK`` (the widest the AOT gate compiles without a spill), fp32 on a
GPU only up to ``TRITON_FP32_MAX_RANK`` (three TF32 passes per product spill on sm_80 at every tile tried above it:
``benchmarks/kernels/aot_report.py``); the dispatcher sends larger ones to the CUDA kernel (cuBLAS) or torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..aot import DTYPE_NAMES, AotCase, labelled, meta, recorded_launches
from ..builtin import (by_name_only, cpp_kernel, cuda_kernel, fp32_on_gpu_at_most, size_at_most, torch_kernel,
                       triton_kernel)
from ..registry import KernelCall, KernelImpl, refusal

OP = "lora_linear"
TRITON_MAX_RANK = 128
TRITON_FP32_MAX_RANK = 32
TRITON_LIMITS = (size_at_most(TRITON_MAX_RANK, "rank", "Triton kernel's"),
                 fp32_on_gpu_at_most(TRITON_FP32_MAX_RANK, "rank", "Triton kernel's", TRITON_MAX_RANK))


# the persistent TMA kernel (persistent.py): not yet run on a GPU, so auto never picks it; its module sends what it
# does not fit (fp32, ranks above its MAX_RANK, Ampere, small grids, dropout in dx) to triton_impl's kernels
PERSISTENT_LIMITS = (*TRITON_LIMITS, by_name_only("not yet measured on a GPU (benchmarks/gpu_check.sh times it)"))


def impls() -> list[KernelImpl]:
    # the C++ LoRA is auto's CPU pick with and without dropout (benchmarks/kernels/README.md)
    return [torch_kernel(OP), cpp_kernel(OP), cuda_kernel(OP), triton_kernel(OP, TRITON_LIMITS),
            triton_kernel(OP, PERSISTENT_LIMITS, name="triton_persistent", module="persistent", priority=25,
                          note="persistent TMA GEMMs for sm_90; by name only until measured on a GPU")]


def aot_cases(ranks: Iterable[int] | None = None) -> list[AotCase]:
    """Forward and backward (dropout on and off, B trained or frozen) at 8192 x 4096 -> 4096 and at a BLIP layer's
    560 x 768 -> 768 (a small grid on 132 SMs), at every rank block up to the largest the dispatcher gives the Triton
    kernels (``TRITON_LIMITS``: fp32 stops lower)."""
    from . import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    for rank in sorted(set(ranks or [16 << i for i in range(8) if 16 << i <= TRITON_MAX_RANK])):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if refusal(TRITON_LIMITS, KernelCall("cuda", dtype, rank)):
                continue  # not the dispatcher's to choose
            for m, n, k in ((8192, 4096, 4096), (560, 768, 768)):
                x, w, bias = meta(m, k, dtype=dtype), meta(n, k, dtype=dtype), meta(n, dtype=dtype)
                a, b, dy = meta(rank, k, dtype=dtype), meta(n, rank, dtype=dtype), meta(m, n, dtype=dtype)
                tag = f"{DTYPE_NAMES[dtype]} r={rank} {m}x{k}->{n}"
                for p in (0.0, 0.1):
                    with recorded_launches() as launches:
                        _, xa = t.forward(x, w, bias if p == 0 else None, a, b, 2.0, p, 1)
                    out += labelled(OP, launches, f"{tag} forward", seen)
                    for needs, what in (((True, False, False, True, True), "backward"),
                                        ((True, False, False, True, False), "backward, B frozen"),
                                        ((False, False, False, False, True), "backward, dB only")):
                        with recorded_launches() as launches:
                            t.backward(dy, x, w, a, b, meta(m, rank, dtype=dtype), 2.0, p, 1, needs)
                        out += labelled(OP, launches, f"{tag} {what}", seen)
    return out + persistent_aot_cases(ranks)


def persistent_aot_cases(ranks: Iterable[int] | None = None) -> list[AotCase]:
    """The persistent kernel's launches at 8192 x 4096 -> 4096 (bf16, fp16; rank blocks up to its limit): forward
    with and without dropout and bias, backward with dB accumulated and with B frozen (and dA's atomic
    ``_wgrad_kernel``). sm_90 only (TMA and wgmma; on other GPUs the module sends every call to triton_impl's
    kernels, gated above)."""
    from . import persistent as p  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    m, n, k = 8192, 4096, 4096
    for rank in sorted(set(ranks or [16 << i for i in range(8) if 16 << i <= p.MAX_RANK])):
        if rank > p.MAX_RANK:
            continue
        for dtype in (torch.bfloat16, torch.float16):
            x, w, bias = meta(m, k, dtype=dtype), meta(n, k, dtype=dtype), meta(n, dtype=dtype)
            a, b, dy = meta(rank, k, dtype=dtype), meta(n, rank, dtype=dtype), meta(m, n, dtype=dtype)
            tag = f"persistent {DTYPE_NAMES[dtype]} r={rank} {m}x{k}->{n}"
            for p_drop in (0.0, 0.1):
                with recorded_launches() as launches:
                    p.forward(x, w, bias if p_drop == 0 else None, a, b, 2.0, p_drop, 1)
                out += labelled(OP, launches, f"{tag} forward", seen, arches=(90,))
            for needs, what in (((True, False, False, True, True), "backward"),
                                ((True, False, False, True, False), "backward, B frozen")):
                with recorded_launches() as launches:
                    p.backward(dy, x, w, a, b, meta(m, rank, dtype=dtype), 2.0, 0.0, 1, needs)
                out += labelled(OP, launches, f"{tag} {what}", seen, arches=(90,))
    return out
