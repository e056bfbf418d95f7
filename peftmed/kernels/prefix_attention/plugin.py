"""The built-in implementations of ``prefix_attention``, registered through ``register_kernels`` (the
same hook a third party uses):

- ``triton`` (priority 30, CUDA; on CPU only by name with TRITON_INTERPRET=1): triton_impl.py
- ``cuda`` (20, compiled on first use where torch has CUDA): csrc/prefix_attention/
- ``torch`` (0, everywhere): reference.py; on CPU it calls torch's flash-attention CPU kernels per
  branch, so it is also the fast CPU path (a C++ version would call the same kernels).
"""

from __future__ import annotations

import torch

from ...hookspecs import hookimpl
from .. import build
from ..plugin import FLOATS, PRIORITY, _extension_fns, _module_fns, _triton_check, _triton_cpu
from ..registry import KernelImpl

OP = "prefix_attention"
MAX_HEAD_DIM = 256  # one program / block holds a (BLOCK, D) tile of q, k and v
EXTENSION = {"sources": ["prefix_attention/prefix_attention_cuda.cpp", "prefix_attention/prefix_attention.cu"],
             "cuda": True}
# build.EXTENSIONS is the table load_extension reads; the op adds its CUDA entry there itself
build.EXTENSIONS.setdefault(f"{OP}_cuda", EXTENSION)


def _head_dim(size: int) -> str | None:
    return None if size <= MAX_HEAD_DIM else f"head dim {size} is above the kernel's {MAX_HEAD_DIM}"


def impls() -> list[KernelImpl]:
    return [
        KernelImpl(OP, "torch", PRIORITY["torch"], ("cpu", "cuda"), FLOATS + (torch.float64,),
                   loader=lambda: _module_fns(f"peftmed.kernels.{OP}.reference"),
                   description="PyTorch: CPU flash kernels (one call over a transient concatenation up to 160 "
                               "keys, else per branch merged in place), matmuls elsewhere or with dropout"),
        KernelImpl(OP, "cuda", PRIORITY["cuda"], ("cuda",), FLOATS,
                   loader=lambda: _extension_fns(f"{OP}_cuda", cuda=True),
                   check=lambda: build.extension_status(f"{OP}_cuda"), accepts=_head_dim,
                   description=f"CUDA (csrc/{OP}/{OP}.cu), compiled on first use"),
        KernelImpl(OP, "triton", PRIORITY["triton"], ("cuda",), FLOATS,
                   loader=lambda: _module_fns(f"peftmed.kernels.{OP}.triton_impl"),
                   check=_triton_check, accepts=_head_dim, explicit_devices=_triton_cpu,
                   description=f"Triton (peftmed/kernels/{OP}/triton_impl.py)"),
    ]


@hookimpl
def register_kernels(register):
    for impl in impls():
        register(impl)
