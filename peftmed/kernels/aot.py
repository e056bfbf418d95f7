"""Ahead-of-time compilation of every Triton kernel for a GPU this machine does not have.

Triton compiles for any NVIDIA target without one (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))``) and ships ``ptxas``, whose ``-v`` report gives what decides a kernel's speed before it ever runs:
registers per thread, bytes spilled to local memory, shared memory, and whether the tensor-core path is the
Hopper one (``wgmma``) or the Ampere one (``mma.sync``).

``cases()`` are the launches the launchers themselves make at the target shapes (recorded, not run, with meta
tensors standing for a GPU's: ``recorded_launches``), so they cannot drift from the launchers' tiles, grids and
arguments; ``compile_case`` compiles each with what Triton's JIT derives from its arguments (``specialise``:
unit strides as constants, 16-byte alignment and divisibility by 16 as attributes), i.e. the kernel that runs,
not a generic one of other registers and pipelining; ``report()`` compiles them all; ``benchmarks/kernels/aot_report.py`` prints the table and
``tests/kernels/test_aot.py`` fails on any spill or on shared memory above the target's limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .plugin import TRITON_MAX, lora_triton_fits, prefix_triton_fits

# the most shared memory one block may use (the opt-in maximum), per compute capability
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass
class AotCase:
    """One kernel launch as a launcher makes it: its positional arguments (meta tensors, ints, floats) and keyword
    arguments (constexprs, ``num_warps``, ``num_stages``). Compiled with what Triton's JIT derives from those
    arguments at launch: 16-byte-aligned pointers and ints divisible by 16 marked so, ints equal to 1 made
    constants (a unit stride: contiguous, vectorised loads), so the gate compiles the kernel that runs."""

    op: str
    kernel: Callable
    label: str  # what the row says (shapes, dtype, flags)
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.kwargs.get("num_stages", 3))

    @property
    def constexprs(self) -> dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k not in ("num_warps", "num_stages")}


def specialise(case: AotCase, arch: int = 90):
    """(options, signature, constexprs, attrs) as Triton's JIT computes them for this launch (its own binder
    and packing, so the report follows the installed Triton's rules)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = case.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*case.args, **case.kwargs)
    return kernel._pack_args(backend, case.kwargs, bound, specialization, options)


@contextlib.contextmanager
def recorded_launches(sms: int = 132):
    """Within it a Triton kernel launch is recorded (as an ``AotCase`` without label), not run, and the
    launchers take meta tensors for tensors on a GPU of ``sms`` SMs: calling a launcher (``forward``,
    ``backward``) with meta tensors of the target shapes gives the launches it makes there."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    from .triton_reduce import as_gpu  # deferred, as triton: the module imports triton

    launches: list[AotCase] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(AotCase("", self, "", args, kwargs))

    with as_gpu(sms), mock.patch.object(JITFunction, "run", record):
        yield launches


def _meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _labelled(op: str, launches: list[AotCase], tag: str, seen: dict) -> list[AotCase]:
    """The launches as cases labelled ``tag`` and the kernel's flags that are on; one per distinct compilation
    (the same kernel, constexprs and JIT specialisation at two shapes compiles once)."""
    out = []
    for c in launches:
        sig = specialise(c)
        key = (c.name, repr(sig[1]), repr(sorted(sig[2].items(), key=str)), repr(sig[3]), c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen[key] = True
        flags = [k for k, v in c.constexprs.items() if v is True and k.isupper() and k not in ("UPCAST",)]
        out.append(dataclasses.replace(c, op=op, label=" ".join([tag, *flags])))
    return out


# ---- the cases: the launchers' own launches at the target shapes ------------------------------------------
def lora_cases(ranks: Iterable[int] | None = None) -> list[AotCase]:
    """LoRA forward and backward (dropout on and off, B trained or frozen) at 8192 x 4096 -> 4096 and at a BLIP
    layer's 560 x 768 -> 768 (a small grid on 132 SMs), at every rank block up to the largest the dispatcher
    gives the Triton kernels (``TRITON_MAX``; fp32 stops lower)."""
    from .lora_linear import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    top = TRITON_MAX["lora_linear"]
    for rank in sorted(set(ranks or [16 << i for i in range(8) if 16 << i <= top])):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if lora_triton_fits("cuda", dtype, rank):
                continue  # not the dispatcher's to choose
            for m, n, k in ((8192, 4096, 4096), (560, 768, 768)):
                x, w, bias = _meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype), _meta(n, dtype=dtype)
                a, b, dy = _meta(rank, k, dtype=dtype), _meta(n, rank, dtype=dtype), _meta(m, n, dtype=dtype)
                tag = f"{DTYPE_NAMES[dtype]} r={rank} {m}x{k}->{n}"
                for p in (0.0, 0.1):
                    with recorded_launches() as launches:
                        _, xa = t.forward(x, w, bias if p == 0 else None, a, b, 2.0, p, 1)
                    out += _labelled("lora_linear", launches, f"{tag} forward", seen)
                    for needs, what in (((True, False, False, True, True), "backward"),
                                        ((True, False, False, True, False), "backward, B frozen"),
                                        ((False, False, False, False, True), "backward, dB only")):
                        with recorded_launches() as launches:
                            t.backward(dy, x, w, a, b, _meta(m, rank, dtype=dtype), 2.0, p, 1, needs)
                        out += _labelled("lora_linear", launches, f"{tag} {what}", seen)
    return out


def layer_norm_cases(widths: Iterable[int] = (768, 1024)) -> list[AotCase]:
    """LayerNorm forward and backward (dx wanted or not) over 32768 rows at each width the targets name, plus the
    widest the dispatcher lets the Triton kernel take (``TRITON_MAX``)."""
    from .layer_norm import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    for n in sorted(set(widths) | {TRITON_MAX["layer_norm"]}):
        for dtype in (torch.bfloat16, torch.float32):
            x, w = _meta(32768, n, dtype=dtype), _meta(n, dtype=dtype)
            tag = f"{DTYPE_NAMES[dtype]} N={n}"
            with recorded_launches() as launches:
                _, mean, rstd = t.forward(x, w, _meta(n, dtype=dtype), 1e-5)
            out += _labelled("layer_norm", launches, f"{tag} forward", seen)
            for needs in ((True, True, True), (False, True, True)):
                with recorded_launches() as launches:
                    t.backward(_meta(32768, n, dtype=dtype), x, w, mean, rstd, needs)
                out += _labelled("layer_norm", launches, f"{tag} backward", seen)
    return out


PREFIX_SHAPES = ((10, 35), (64, 1024))  # (prefix length, sequence length): the targets' extremes, B32 H12


def prefix_attention_cases(head_dims: Iterable[int] = (64, 128),
                           dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float32),
                           tiles: dict[str, dict] | None = None) -> list[AotCase]:
    """Prefix attention forward and backward at B32 H12 with a (B, Tk) padding mask, causality and dropout all on
    and all off, at the targets' shortest and longest prefix and sequence. ``tiles`` replaces the launchers'
    (a search)."""
    from unittest import mock

    from .prefix_attention import triton_impl as t  # deferred: imports triton

    out: list[AotCase] = []
    seen: dict = {}
    b, h = 32, 12
    for d in head_dims:
        for dtype in dtypes:
            if tiles is None and prefix_triton_fits("cuda", dtype, d):
                continue  # not the dispatcher's to choose
            for n, tq in PREFIX_SHAPES:
                q = _meta(b, h, tq, d, dtype=dtype)
                pk = _meta(h, n, d, dtype=dtype)
                for full in (False, True):
                    mask = _meta(b, 1, 1, tq, dtype=torch.bool) if full else None
                    p = 0.1 if full else 0.0
                    tag = f"{DTYPE_NAMES[dtype]} D={d} P{n} T{tq} {'mask+causal+dropout' if full else 'plain'}"
                    patch = mock.patch.object(t, "config", lambda *a, **k: tiles) if tiles else contextlib.nullcontext()
                    with patch, recorded_launches() as launches:
                        o, lse = t.forward(q, q, q, pk, pk, mask, full, None, p, 1)
                        t.backward(q, q, q, q, pk, pk, mask, full, None, p, 1, o, lse)
                    out += _labelled("prefix_attention", launches, tag, seen)
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

    options, signature, constexprs, attrs = specialise(case, arch)
    src = ASTSource(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
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

    from .prefix_attention import triton_impl as t  # deferred: imports triton

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
