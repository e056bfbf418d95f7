"""Ahead-of-time compilation of every Triton kernel for a GPU this machine does not have.

Triton compiles for any NVIDIA target without one (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))``) and ships ``ptxas``, whose ``-v`` report gives what decides a kernel's speed before it ever runs:
registers per thread, bytes spilled to local memory, shared memory, and whether the tensor-core path is the
Hopper one (``wgmma``) or the Ampere one (``mma.sync``).

``cases()`` lists each kernel at every launch configuration its launcher can choose at the target shapes
(the launchers' own ``*_config`` functions decide the tiles, so this list cannot drift from them);
``report()`` compiles them; ``benchmarks/kernels/aot_report.py`` prints the table and
``tests/kernels/test_aot.py`` fails on any spill or on shared memory above the target's limit.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

# the most shared memory one block may use (the opt-in maximum), per compute capability
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass
class AotCase:
    """One kernel at one launch configuration."""

    op: str
    kernel: Callable
    label: str  # what the row says (shapes, dtype, flags)
    args: dict[str, str]  # runtime argument -> Triton type ("*bf16", "i32", "fp32")
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


def _signature(kernel, args: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in args:
            sig[name] = args[name]
        else:
            raise KeyError(f"{kernel.fn.__name__}: no type for argument {name!r}")
    return sig


def _types(kernel, dtype: torch.dtype, floats: Iterable[str] = (), ptr_types: dict[str, str] | None = None
           ) -> dict[str, str]:
    """Pointers of ``dtype`` (``ptr_types`` overrides some), the named float scalars, every other argument i32."""
    out = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            out[name] = (ptr_types or {}).get(name, PTR[dtype])
        elif name in floats:
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


# ---- the cases, from the launchers' configurations at the target shapes --------------------------------
def lora_cases(ranks: Iterable[int] | None = None) -> list[AotCase]:
    """LoRA at 8192 x 4096 -> 4096 (the launchers' tiles depend on the rank, not the sizes) at every rank
    block up to the largest the dispatcher gives the Triton kernels (``TRITON_MAX``; fp32 stops lower)."""
    from . import triton_reduce as r
    from .lora_linear import triton_impl as t
    from .plugin import TRITON_MAX, lora_triton_fits

    out = []
    top = TRITON_MAX["lora_linear"]
    for rank in sorted(set(ranks or [16 << i for i in range(8) if 16 << i <= top])):
        br = t._block_r(rank)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if lora_triton_fits("cuda", dtype, rank):
                continue  # not the dispatcher's to choose
            dot = t._dot_args(dtype, gpu=True)
            tag = f"{DTYPE_NAMES[dtype]} r={rank}"
            # the large tiles (8192 x 4096 output) and the small-grid ones (a BLIP layer, 560 x 768, on 132 SMs)
            for shape, (m, n) in (("", (8192, 4096)), (" 560x768", (560, 768))):
                g = t.gemm_config(dtype, gpu=True, block_r=br, m=m, n=n, sms=132)
                tiles = {k: v for k, v in g.items() if k.startswith(("BLOCK", "GROUP"))}
                for bias, dropout, what in ((True, False, "y = xW^T + b + s xa B^T"), (False, True, "dx, dropout")):
                    out.append(AotCase("lora_linear", t._gemm_lora_kernel, f"{tag}{shape} {what}",
                                       _types(t._gemm_lora_kernel, dtype, ("alpha", "drop_scale")),
                                       dict(HAS_BIAS=bias, DROPOUT=dropout, BLOCK_R=br, **tiles, **dot),
                                       g["num_warps"], g["num_stages"]))
            d = t.down_config(dtype, gpu=True, block_r=br)
            for dropout in (False, True):
                out.append(AotCase("lora_linear", t._down_kernel, f"{tag} xa / gs, dropout={dropout}",
                                   _types(t._down_kernel, dtype, ("alpha", "drop_scale")),
                                   dict(DROPOUT=dropout, BLOCK_M=d["BLOCK_M"], BLOCK_K=d["BLOCK_K"], BLOCK_R=br,
                                        **dot), d["num_warps"], d["num_stages"]))
            gd = t.gs_db_config(dtype, gpu=True, block_r=br)
            out.append(AotCase("lora_linear", t._gs_db_kernel, f"{tag} gs and dB partials, one pass over dy",
                               _types(t._gs_db_kernel, dtype, ("alpha",), {"part_ptr": "*fp32"}),
                               dict(BLOCK_M=gd["BLOCK_M"], BLOCK_N=gd["BLOCK_N"], BLOCK_R=br, **dot),
                               gd["num_warps"], gd["num_stages"]))
            w = t.wgrad_config(dtype, gpu=True, block_r=br)
            for dropout in (False, True):
                out.append(AotCase("lora_linear", t._wgrad_kernel, f"{tag} dA / dB, dropout={dropout}",
                                   _types(t._wgrad_kernel, dtype, ("drop_scale",), {"part_ptr": "*fp32"}),
                                   dict(DROPOUT=dropout, BLOCK_M=w["BLOCK_M"], BLOCK_N=w["BLOCK_N"], BLOCK_R=br, **dot),
                                   w["num_warps"], w["num_stages"]))
    for dtype in (torch.bfloat16, torch.float32):
        out.append(AotCase("lora_linear", r._reduce_kernel, f"{DTYPE_NAMES[dtype]} stage-2 reduction",
                           _types(r._reduce_kernel, dtype, ("scale",), {"part_ptr": "*fp32"}), dict(BLOCK_N=256), 4, 1))
    return out


def layer_norm_cases(widths: Iterable[int] = (768, 1024)) -> list[AotCase]:
    """LayerNorm forward and backward at each width the targets name, plus the widest the dispatcher lets
    the Triton kernel take (``TRITON_MAX``)."""
    from .layer_norm import triton_impl as t
    from .plugin import TRITON_MAX

    out = []
    for n in sorted(set(widths) | {TRITON_MAX["layer_norm"]}):
        for dtype in (torch.bfloat16, torch.float32):
            f = t.fwd_config(n)
            out.append(AotCase("layer_norm", t._fwd_kernel, f"{DTYPE_NAMES[dtype]} N={n} forward",
                               _types(t._fwd_kernel, dtype, ("eps",), {"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}),
                               dict(BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"]), f["num_warps"], 1))
            b = t.bwd_config(n)
            out.append(AotCase("layer_norm", t._bwd_kernel, f"{DTYPE_NAMES[dtype]} N={n} backward",
                               _types(t._bwd_kernel, dtype, (), {"mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                                                                 "pw_ptr": "*fp32", "pb_ptr": "*fp32"}),
                               dict(NEED_DX=True, BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"]), b["num_warps"], 1))
    return out


def prefix_attention_cases(head_dims: Iterable[int] = (64, 128),
                           dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float32),
                           tiles: dict[str, dict] | None = None) -> list[AotCase]:
    """Prefix attention at B32 H12 (the tiles depend on the head dim and element size only), with the most and
    the fewest features on (mask, causality, dropout). ``tiles`` replaces the launchers' (a search)."""
    from .plugin import prefix_triton_fits
    from .prefix_attention import triton_impl as t

    out = []
    ptrs = {"m_ptr": "*u8", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    floats = ("scale", "drop_scale")
    for d in head_dims:
        for dtype in dtypes:
            if tiles is None and prefix_triton_fits("cuda", dtype, d):
                continue  # not the dispatcher's to choose
            cfg = tiles or t.config(d, dtype, gpu=True)

            def case(kernel, which, label, extra, types=None):
                c = cfg[which]
                return AotCase("prefix_attention", kernel, label, types or _types(kernel, dtype, floats, ptrs),
                               dict(**extra, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=c["BLOCK_D"]),
                               c["num_warps"], c["num_stages"])

            for full in (False, True):
                flags = dict(HAS_MASK=full, DROPOUT=full, UPCAST=False)
                tag = f"{DTYPE_NAMES[dtype]} D={d} {'mask+causal+dropout' if full else 'plain'}"
                out.append(case(t._fwd_kernel, "fwd", f"{tag} forward", dict(CAUSAL=full, **flags)))
                for prefix in (False, True):
                    part = "*fp32" if prefix else PTR[dtype]
                    out.append(case(t._dkdv_kernel, "dkdv", f"{tag} d{'prefix' if prefix else 'seq'} k/v",
                                    dict(PREFIX=prefix, CAUSAL=full and not prefix, **flags),
                                    _types(t._dkdv_kernel, dtype, floats, {**ptrs, "dk_ptr": part, "dv_ptr": part})))
                out.append(case(t._dq_kernel, "dq", f"{tag} dq", dict(CAUSAL=full, **flags)))
            if tiles is None:
                out.append(AotCase("prefix_attention", t._delta_kernel, f"{DTYPE_NAMES[dtype]} D={d} delta",
                                   _types(t._delta_kernel, dtype, (), {"delta_ptr": "*fp32"}),
                                   dict(BLOCK_M=64, BLOCK_D=cfg["fwd"]["BLOCK_D"]), 4, 1))
    return out


def cases() -> list[AotCase]:
    return lora_cases() + layer_norm_cases() + prefix_attention_cases()


# ---- compiling -----------------------------------------------------------------------------------------
def ptxas_path() -> Path:
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return Path(env)
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_case(case: AotCase, arch: int = 90) -> dict[str, Any]:
    """Compile ``case`` for sm_<arch>; registers, spills, shared memory, tensor-core instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = case.kernel
    sig = _signature(kernel, case.args, case.constexprs)
    consts = {(kernel.arg_names.index(k),): v for k, v in case.constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    ptx = compiled.asm["ptx"]
    gpu_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([str(ptxas_path()), "-v", "--gpu-name", gpu_name, str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    info = res.stderr + res.stdout
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on {case.name} ({case.label}): {info[-500:]}")
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    stores, loads = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    smem = int(compiled.metadata.shared)
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "-")
    limit = SMEM_LIMIT.get(arch, 99 * 1024)
    return {"op": case.op, "kernel": case.name, "config": case.label, "arch": f"sm_{arch}",
            "warps": case.num_warps, "stages": case.num_stages, "registers": regs, "spill_stores": stores,
            "spill_loads": loads, "shared": smem, "shared_limit": limit, "mma": mma,
            "serialized_wgmma": "wgmma.mma_async instructions are serialized" in info,
            "ok": stores == 0 and loads == 0 and smem <= limit}


def report(arches: Iterable[int] = (90, 80), selected: list[AotCase] | None = None, workers: int = 1
           ) -> list[dict[str, Any]]:
    jobs = [(case, arch) for arch in arches for case in (selected if selected is not None else cases())]
    if workers <= 1:
        return [compile_case(c, a) for c, a in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:  # ptxas runs in subprocesses: threads overlap them
        return list(pool.map(lambda job: compile_case(*job), jobs))


# ---- the tile search behind the launchers' tables ------------------------------------------------------
PREFIX_CANDIDATES = ((128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2),
                     (64, 32, 4, 2), (32, 32, 8, 2), (32, 32, 8, 1), (32, 32, 4, 2), (32, 16, 4, 1), (16, 32, 8, 1),
                     (16, 16, 4, 1))


def search_prefix_tiles(arches: Iterable[int] = (90, 80), workers: int = 2) -> dict:
    """For each (head dim, element size) and kernel, the first of ``PREFIX_CANDIDATES`` (largest first) that
    compiles with no spill and within shared memory on every arch with every feature set: what
    ``prefix_attention.triton_impl.GPU_TILES`` holds."""
    from concurrent.futures import ThreadPoolExecutor

    from .prefix_attention import triton_impl as t

    names = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}

    def one(group):
        d, dtype, which = group
        for bm, bn, w, st in PREFIX_CANDIDATES:
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, num_warps=w, num_stages=st)
            sel = [c for c in prefix_attention_cases((d,), (dtype,), {k: tile for k in t.KERNELS})
                   if c.name == names[which]]
            if all(compile_case(c, a)["ok"] for a in arches for c in sel):
                return group, (bm, bn, w, st)
        return group, None

    groups = [(d, dtype, which) for d in (64, 128) for dtype in (torch.bfloat16, torch.float32)
              for which in t.KERNELS]
    with ThreadPoolExecutor(workers) as pool:
        found = dict(pool.map(one, groups))
    table: dict = {}
    for (d, dtype, which), tile in found.items():
        table.setdefault((d, dtype.itemsize), {})[which] = tile
    return table
