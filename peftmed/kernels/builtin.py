"""What the built-in implementations of every op share: priorities, how each kind is loaded and when it is
available, and the kinds of limit. Each op's folder (``<op>/impls.py``) declares its own implementations and
limits with these; :mod:`.plugin` registers them.

Kinds: ``torch`` (the op's ``reference.py``: everywhere, the test oracle), ``cpp`` (CPU, compiled on first use),
``cuda`` (compiled on first use where torch has CUDA), ``triton`` (GPU; on the CPU only when asked for by name with
TRITON_INTERPRET=1, which is how the tests run it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence

import torch

from . import build
from .registry import KernelCall, KernelImpl, Limit

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
PRIORITY = {"triton": 30, "cuda": 20, "cpp": 10, "torch": 0}


def module_fns(module: str) -> dict:
    """An implementation written in Python: the module's ``forward`` and ``backward`` (and its optional
    ``needs_out``: (inputs, p) -> whether backward reads the forward's output; ``autograd``: the op's result under
    torch's autograd for eager calls, or None)."""
    mod = importlib.import_module(module)
    fns = {"forward": mod.forward, "backward": mod.backward}
    for optional in ("needs_out", "autograd"):
        if hasattr(mod, optional):
            fns[optional] = getattr(mod, optional)
    return fns


def extension_fns(name: str, *, cuda: bool) -> dict:
    """An implementation compiled from ``build.EXTENSIONS[name]`` (compiled on first use)."""
    ext = build.load_extension(name)
    if not cuda:
        return {"forward": ext.forward, "backward": ext.backward}

    def stream() -> int:  # .cu launchers take the current stream (no c10/cuda headers there)
        return torch.cuda.current_stream().cuda_stream

    return {"forward": lambda *a: ext.forward(*a, stream()), "backward": lambda *a: ext.backward(*a, stream())}


def triton_check() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it interpreted)"
    return True, ""


# ---- kinds of limit ----------------------------------------------------------------------------------------
def size_at_most(limit: int, what: str, whose: str) -> Limit:
    """Sizes above ``limit`` (what the AOT gate compiled, or what a block holds) are refused."""
    def check(call: KernelCall) -> str | None:
        if call.size is not None and call.size > limit:
            return f"{what} {call.size} is above the {whose} {limit}"
        return None
    return check


def fp32_on_gpu_at_most(limit: int, what: str, whose: str, wider: int) -> Limit:
    """fp32 on a GPU (three TF32 passes per product hold more registers) stops at ``limit``; bf16/fp16 at ``wider``."""
    def check(call: KernelCall) -> str | None:
        if call.device == "cuda" and call.dtype == torch.float32 and call.size is not None and call.size > limit:
            return (f"fp32 at {what} {call.size} is above the {whose} {limit} on a GPU (it would spill registers); "
                    f"bf16/fp16 go to {wider}")
        return None
    return check


def by_name_only(why: str) -> Limit:
    """Taken only when asked for by name (``why``: e.g. not yet measured where it is meant to run)."""
    def check(call: KernelCall) -> str | None:
        return None if call.explicit else f"taken only when asked for by name: {why}"
    return check


def interpreted_on_cpu(call: KernelCall) -> str | None:
    """A Triton kernel takes the CPU only interpreted (TRITON_INTERPRET=1) and only when asked for by name."""
    if call.device != "cpu":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "runs on the CPU only interpreted (set TRITON_INTERPRET=1 before importing triton)"
    if not call.explicit:
        return "on the CPU only when asked for by name (interpreted: a test path, not a fast one)"
    return None


# ---- the built-in kinds ------------------------------------------------------------------------------------
def torch_kernel(op: str, description: str = "PyTorch reference (fallback and test oracle)") -> KernelImpl:
    return KernelImpl(op, "torch", PRIORITY["torch"], ("cpu", "cuda", "meta"), FLOATS + (torch.float64,),
                      loader=lambda: module_fns(f"peftmed.kernels.{op}.reference"), description=description)


def cpp_kernel(op: str, priority: int = PRIORITY["cpp"]) -> KernelImpl:
    name = f"{op}_cpu"
    return KernelImpl(op, "cpp", priority, ("cpu",), FLOATS, loader=lambda: extension_fns(name, cuda=False),
                      check=lambda: build.extension_status(name),
                      description=f"C++ (csrc/{op}/{op}.cpp), compiled on first use")


def cuda_kernel(op: str, limits: Sequence[Limit] = ()) -> KernelImpl:
    name = f"{op}_cuda"
    return KernelImpl(op, "cuda", PRIORITY["cuda"], ("cuda",), FLOATS, loader=lambda: extension_fns(name, cuda=True),
                      check=lambda: build.extension_status(name), limits=tuple(limits),
                      description=f"CUDA (csrc/{op}/{op}.cu), compiled on first use")


def triton_kernel(op: str, limits: Sequence[Limit] = (), name: str = "triton", module: str = "triton_impl",
                  priority: int = PRIORITY["triton"], note: str = "CPU: interpreted, by name only") -> KernelImpl:
    return KernelImpl(op, name, priority, ("cuda", "cpu"), FLOATS,
                      loader=lambda: module_fns(f"peftmed.kernels.{op}.{module}"), check=triton_check,
                      limits=(interpreted_on_cpu, *limits), description=f"Triton (peftmed/kernels/{op}/{module}.py; {note})")
