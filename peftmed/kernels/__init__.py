"""Kernel ops on the hot paths, each with a PyTorch reference and fast implementations.

Public API (methods call these):
  lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False, impl=None)
  layer_norm(x, weight, bias, eps=1e-5, impl=None)
  FusedLayerNorm: an nn.LayerNorm drop-in that calls layer_norm

``impl`` is ``None``/``"auto"`` (fastest that runs here; PEFTMED_KERNEL_IMPL[_<OP>] overrides) or an
implementation name (``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``, or one a plugin registered).
Layout: one folder per op (``<op>/reference.py``, ``<op>/op.py``, ``<op>/triton_impl.py``) and its
C++/CUDA sources in ``csrc/<op>/``; implementations are registered in :mod:`.plugin`; dispatch is in
:mod:`.registry`; compiling in :mod:`.build`. See docs/kernels.md.
"""

from __future__ import annotations

from torch import nn

from .layer_norm.op import layer_norm
from .lora_linear.op import lora_linear
from .registry import KernelImpl, KernelInputError, KernelUnavailableError, clear_cache, implementations, resolve


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward goes through peftmed's layer_norm op (same parameters)."""

    impl: str | None = None

    @classmethod
    def from_module(cls, ln: nn.LayerNorm, impl: str | None = None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing ``ln``'s parameters (the same Parameter objects, not copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = ln.normalized_shape
        new.eps = ln.eps
        new.elementwise_affine = ln.elementwise_affine
        new.weight = ln.weight
        new.bias = ln.bias
        new.impl = impl
        new.train(ln.training)
        return new

    def forward(self, x):
        if len(self.normalized_shape) != 1 or self.weight is None:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl or 'auto'}"


__all__ = [
    "FusedLayerNorm", "KernelImpl", "KernelInputError", "KernelUnavailableError", "clear_cache",
    "implementations", "layer_norm", "lora_linear", "resolve",
]
