"""The built-in kernel implementations of the three ops, registered as a plugin like any other.

Each op's folder declares its own (``<op>/impls.py``: the implementations and their limits, and the AOT cases that
gate its Triton kernels; ``<op>/extensions.py``: what its C++/CUDA extensions are compiled from). What the built-in
implementations share (priorities, loaders, kinds of limit) is :mod:`.builtin`. A third party registers a
``KernelImpl`` for an op the same way, with a higher priority to make ``auto`` prefer it.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .aot import AotCase
from .build import OPS
from .layer_norm import impls as layer_norm
from .lora_linear import impls as lora_linear
from .prefix_attention import impls as prefix_attention
from .registry import KernelImpl

_OPS = {"lora_linear": lora_linear, "layer_norm": layer_norm, "prefix_attention": prefix_attention}
assert tuple(_OPS) == OPS, "build.OPS names the folders whose extension tables are read"


def builtin_impls() -> list[KernelImpl]:
    return [impl for declared in _OPS.values() for impl in declared.impls()]


def aot_cases() -> list[AotCase]:
    """Every op's AOT cases: the launches its Triton launchers make at the target shapes (imports triton)."""
    return [case for declared in _OPS.values() for case in declared.aot_cases()]


@hookimpl
def register_kernels(register):
    for impl in builtin_impls():
        register(impl)
