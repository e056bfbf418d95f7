"""Ahead-of-time compilation of every Triton kernel for a GPU this machine does not have.

Triton compiles for any NVIDIA target without one (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))``) and ships ``ptxas``, whose ``-v`` report gives what decides a kernel's speed before it ever runs:
registers per thread, bytes spilled to local memory, shared memory, and whether the tensor-core path is the
Hopper one (``wgmma``) or the Ampere one (``mma.sync``).

The cases are the launches the launchers themselves make at the target shapes (recorded, not run, with meta
tensors standing for a GPU's: ``recorded_launches``), so they cannot drift from the launchers' tiles, grids and
arguments; each op's folder declares its own (``<op>/impls.py``: ``aot_cases``; ``plugin.aot_cases()`` gathers
them); ``compile_case`` compiles each with what Triton's JIT derives from its arguments (``specialise``:
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
    arches: tuple[int, ...] | None = None  # the targets it is meant for (None: every one the report compiles)
    grid: tuple | None = None  # the launch's grid as the launcher gave it

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
def recorded_launches(sms: int = 132, capability: tuple[int, int] = (9, 0)):
    """Within it a Triton kernel launch is recorded (as an ``AotCase`` without label), not run, and the
    launchers take meta tensors for tensors on a GPU of ``sms`` SMs and this compute capability: calling a launcher
    (``forward``, ``backward``) with meta tensors of the target shapes gives the launches it makes there."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    from .triton_reduce import as_gpu  # deferred, as triton: the module imports triton

    launches: list[AotCase] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(AotCase("", self, "", args, kwargs, grid=tuple(grid) if not callable(grid) else None))

    with as_gpu(sms, capability), mock.patch.object(JITFunction, "run", record):
        yield launches


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def labelled(op: str, launches: list[AotCase], tag: str, seen: dict, arches: tuple[int, ...] | None = None
             ) -> list[AotCase]:
    """The launches as cases labelled ``tag`` and the kernel's flags that are on; one per distinct compilation
    (the same kernel, constexprs and JIT specialisation at two shapes compiles once)."""
    out = []
    for c in launches:
        sig = specialise(c)
        key = (c.name, repr(sig[1]), repr(sorted(sig[2].items(), key=str)), repr(sig[3]), c.num_warps, c.num_stages,
               arches)
        if key in seen:
            continue
        seen[key] = True
        flags = [k for k, v in c.constexprs.items() if v is True and k.isupper() and k not in ("UPCAST",)]
        out.append(dataclasses.replace(c, op=op, label=" ".join([tag, *flags]), arches=arches))
    return out


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


def report(cases: list[AotCase], arches: Iterable[int] = (90, 80), workers: int = 1) -> list[dict[str, Any]]:
    """Every case compiled for every arch (``plugin.aot_cases()``: every op's)."""
    jobs = [(case, arch) for arch in arches for case in cases if case.arches is None or arch in case.arches]
    if workers <= 1:
        return [compile_case(c, a) for c, a in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:  # ptxas runs in subprocesses: threads overlap them
        return list(pool.map(lambda job: compile_case(*job), jobs))
