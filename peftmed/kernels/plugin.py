"""Built-in kernel implementations of the three ops (a plugin like any other).

``lora_linear`` and ``layer_norm`` get ``torch`` (reference, everywhere), ``cpp`` (CPU, compiled on first
use), ``cuda`` (compiled on first use where torch has CUDA) and ``triton`` (GPU; on CPU only when asked
for by name with TRITON_INTERPRET=1, which is how the tests run it). ``prefix_attention`` gets ``torch``
(on the CPU it calls torch's flash kernels per branch, so it is also the fast CPU path), ``cuda`` and
``triton``. A third party registers a ``KernelImpl`` for an op the same way, with a higher priority to
make ``auto`` prefer it. What is compiled from which source is the one table ``build.EXTENSIONS``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ..hookspecs import hookimpl
from . import build
from .registry import KernelImpl

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("lora_linear", "layer_norm", "prefix_attention")
PRIORITY = {"triton": 30, "cuda": 20, "cpp": 10, "torch": 0}
# rank / row width one program holds without spilling (benchmarks/kernels/aot_report.py checks the widest)
TRITON_MAX = {"lora_linear": 128, "layer_norm": 4096}
# one prefix-attention program / block holds a (BLOCK, D) tile of q, k and v: at D = 256 the Triton kernels need
# 237-280 KB of shared memory (an H100 gives a block 227 KB), so the dispatcher sends larger heads elsewhere
PREFIX_MAX_HEAD_DIM = {"triton": 128, "cuda": 256}  # the CUDA kernel keeps 8 values per lane (32 x 8)
# fp32 prefix attention on a GPU (three TF32 passes per product) spills at every tile above this head dim
# (benchmarks/kernels/aot_report.py): the dispatcher sends it to the CUDA kernel or torch
PREFIX_TRITON_FP32_MAX_HEAD_DIM = 64


def _module_fns(module: str):
    mod = importlib.import_module(module)
    fns = {"forward": mod.forward, "backward": mod.backward}
    if hasattr(mod, "needs_out"):  # optional: (inputs, p) -> whether backward reads the forward's output
        fns["needs_out"] = mod.needs_out
    if hasattr(mod, "autograd"):  # optional: the op's result under torch's autograd (eager calls), or None
        fns["autograd"] = mod.autograd
    return fns


def _extension_fns(name: str, *, cuda: bool):
    ext = build.load_extension(name)
    if not cuda:
        return {"forward": ext.forward, "backward": ext.backward}

    def stream() -> int:  # .cu launchers take the current stream (no c10/cuda headers there)
        return torch.cuda.current_stream().cuda_stream

    return {"forward": lambda *a: ext.forward(*a, stream()), "backward": lambda *a: ext.backward(*a, stream())}


def _triton_check() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it interpreted)"
    return True, ""


def _triton_cpu() -> tuple[str, ...]:
    return ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def _max_size(op: str):
    limit = TRITON_MAX[op]
    what = "rank" if op == "lora_linear" else "row width"
    return lambda size: None if size <= limit else f"{what} {size} is above the Triton kernel's {limit}"


# Measured on an idle 2-core CPU (benchmarks/kernels/README.md): the C++ LayerNorm is 1.2x slower than
# torch's native one (both near the memory-bandwidth floor), so auto keeps native there; the C++ op
# stays available by name (impl="cpp"). The C++ LoRA is auto's CPU pick with and without dropout.
CPP_PRIORITY = {"layer_norm": PRIORITY["torch"] - 10}


def _head_dim(impl: str):
    limit = PREFIX_MAX_HEAD_DIM[impl]
    return lambda size: None if size <= limit else f"head dim {size} is above the {impl} kernel's {limit}"


# fp32 LoRA on a GPU (three TF32 passes per product) spills on sm_80 at every tile tried above this rank
# (benchmarks/kernels/aot_report.py): the dispatcher sends it to the CUDA kernel (cuBLAS) or torch
LORA_TRITON_FP32_MAX_RANK = 32


def lora_triton_fits(device: str, dtype: torch.dtype, size: int | None) -> str | None:
    if device == "cuda" and dtype == torch.float32 and size is not None and size > LORA_TRITON_FP32_MAX_RANK:
        return (f"fp32 at rank {size} is above the Triton kernel's {LORA_TRITON_FP32_MAX_RANK} on a GPU (it would "
                f"spill registers); bf16/fp16 go to {TRITON_MAX['lora_linear']}")
    return None


def prefix_triton_fits(device: str, dtype: torch.dtype, size: int | None) -> str | None:
    if device == "cuda" and dtype == torch.float32 and size is not None and size > PREFIX_TRITON_FP32_MAX_HEAD_DIM:
        return (f"fp32 at head dim {size} is above the Triton kernel's {PREFIX_TRITON_FP32_MAX_HEAD_DIM} on a GPU "
                f"(it would spill registers); bf16/fp16 go to {PREFIX_MAX_HEAD_DIM['triton']}")
    return None


def _prefix_attention_impls() -> list[KernelImpl]:
    op = "prefix_attention"
    return [
        KernelImpl(op, "torch", PRIORITY["torch"], ("cpu", "cuda", "meta"), FLOATS + (torch.float64,),
                   loader=lambda: _module_fns(f"peftmed.kernels.{op}.reference"),
                   description="PyTorch: CPU flash kernels (one call over a transient concatenation up to 160 "
                               "keys, else per branch merged in place), matmuls elsewhere or with dropout"),
        KernelImpl(op, "cuda", PRIORITY["cuda"], ("cuda",), FLOATS,
                   loader=lambda: _extension_fns(f"{op}_cuda", cuda=True),
                   check=lambda: build.extension_status(f"{op}_cuda"), accepts=_head_dim("cuda"),
                   description=f"CUDA (csrc/{op}/{op}.cu), compiled on first use"),
        KernelImpl(op, "triton", PRIORITY["triton"], ("cuda",), FLOATS,
                   loader=lambda: _module_fns(f"peftmed.kernels.{op}.triton_impl"),
                   check=_triton_check, accepts=_head_dim("triton"), explicit_devices=_triton_cpu,
                   fits=prefix_triton_fits, description=f"Triton (peftmed/kernels/{op}/triton_impl.py)"),
    ]


def builtin_impls() -> list[KernelImpl]:
    impls = _prefix_attention_impls()
    for op in ("lora_linear", "layer_norm"):
        impls += [
            KernelImpl(op, "torch", PRIORITY["torch"], ("cpu", "cuda", "meta"), FLOATS + (torch.float64,),
                       loader=lambda op=op: _module_fns(f"peftmed.kernels.{op}.reference"),
                       description="PyTorch reference (fallback and test oracle)"),
            KernelImpl(op, "cpp", CPP_PRIORITY.get(op, PRIORITY["cpp"]), ("cpu",), FLOATS,
                       loader=lambda op=op: _extension_fns(f"{op}_cpu", cuda=False),
                       check=lambda op=op: build.extension_status(f"{op}_cpu"),
                       description=f"C++ (csrc/{op}/{op}.cpp), compiled on first use"),
            KernelImpl(op, "cuda", PRIORITY["cuda"], ("cuda",), FLOATS,
                       loader=lambda op=op: _extension_fns(f"{op}_cuda", cuda=True),
                       check=lambda op=op: build.extension_status(f"{op}_cuda"),
                       description=f"CUDA (csrc/{op}/{op}.cu), compiled on first use"),
            KernelImpl(op, "triton", PRIORITY["triton"], ("cuda",), FLOATS,
                       loader=lambda op=op: _module_fns(f"peftmed.kernels.{op}.triton_impl"),
                       check=_triton_check, accepts=_max_size(op), explicit_devices=_triton_cpu,
                       fits=lora_triton_fits if op == "lora_linear" else None,
                       description=f"Triton (peftmed/kernels/{op}/triton_impl.py)"),
        ]
    return impls


@hookimpl
def register_kernels(register):
    for impl in builtin_impls():
        register(impl)


