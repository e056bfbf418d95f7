"""layer_norm's implementations, their limits and its AOT cases (its compiled extensions: ``extensions.py``).

The Triton kernel holds a whole row in one block: rows up to ``TRITON_MAX_WIDTH`` (at 8192 its 16 warps are capped
at 128 registers and spill: ``benchmarks/kernels/aot_report.py``). The C++ LayerNorm is 1.2x slower than torch's
native one on an idle 2-core CPU (both near the memory-bandwidth floor: benchmarks/kernels/README.md), so auto
keeps native there; the C++ op stays available by name (impl="cpp").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..aot import DTYPE_NAMES, AotCase, labelled, meta, recorded_launches
from ..builtin import PRIORITY, cpp_kernel, cuda_kernel, size_at_most, torch_kernel, triton_kernel
from ..registry import KernelImpl

OP = "layer_norm"
TRITON_MAX_WIDTH = 4096
TRITON_LIMITS = (size_at_most(TRITON_MAX_WIDTH, "row width", "Triton kernel's"),)


def impls() -> list[KernelImpl]:
    return [torch_kernel(OP), cpp_kernel(OP, priority=PRIORITY["torch"] - 10), cuda_kernel(OP),
            triton_kernel(OP, TRITON_LIMITS)]


def aot_cases(widths: Iterable[int] = (768, 1024)) -> list[AotCase]:
    """Forward and backward (dx wanted or not) over 32768 rows at each width the targets name, plus the widest the
    dispatcher lets the Triton kernel take (``TRITON_MAX_WIDTH``)."""
    from . import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    for n in sorted(set(widths) | {TRITON_MAX_WIDTH}):
        for dtype in (torch.bfloat16, torch.float32):
            x, w = meta(32768, n, dtype=dtype), meta(n, dtype=dtype)
            tag = f"{DTYPE_NAMES[dtype]} N={n}"
            with recorded_launches() as launches:
                _, mean, rstd = t.forward(x, w, meta(n, dtype=dtype), 1e-5)
            out += labelled(OP, launches, f"{tag} forward", seen)
            for needs in ((True, True, True), (False, True, True)):
                with recorded_launches() as launches:
                    t.backward(meta(32768, n, dtype=dtype), x, w, mean, rstd, needs)
                out += labelled(OP, launches, f"{tag} backward", seen)
    return out
