"""Kernel ops on the hot paths, each with a PyTorch reference and fast implementations.

Public API (methods and models call these; ``registry`` is the model's, None the default one):
  lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False, impl=None, registry=None)
  layer_norm(x, weight, bias, eps=1e-5, impl=None, registry=None)
  prefix_attention(q, k, v, prefix_k, prefix_v, mask=None, *, causal, scale, dropout_p, impl, registry)
  FusedLayerNorm: an nn.LayerNorm drop-in that calls layer_norm

``impl`` is ``None``/``"auto"`` (fastest that runs here; PEFTMED_KERNEL_IMPL[_<OP>] overrides) or an
implementation name (``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``, or one a plugin registered).
Layout: one folder per op (``<op>/reference.py``: the oracle and the signature of every implementation;
``<op>/op.py``: checks, dispatch, autograd, torch.library; ``<op>/triton_impl.py``; ``<op>/impls.py``: its
implementations, their limits and its AOT cases; ``<op>/extensions.py``: what its C++/CUDA extensions compile) and
its C++/CUDA sources in ``csrc/<op>/`` (shipped in the package); :mod:`.plugin` registers every op's implementations;
dispatch is in :mod:`.registry`; compiling in :mod:`.build`. kernels/ imports nothing from the
CLI, the methods or the backbones. See docs/kernels.md.
"""

from __future__ import annotations

from torch import nn

from .layer_norm.op import layer_norm
from .lora_linear.op import lora_linear
from .prefix_attention.op import prefix_attention
from .registry import KernelCall, KernelImpl, KernelInputError, KernelUnavailableError, clear_cache, implementations, resolve


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward goes through peftmed's layer_norm op (same parameters)."""

    impl: str | None = None
    registry = None  # the kernel registry of the model this norm belongs to (None: the default one)

    @classmethod
    def from_module(cls, ln: nn.LayerNorm, impl: str | None = None, registry=None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing ``ln``'s parameters (the same Parameter objects, not copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = ln.normalized_shape
        new.eps = ln.eps
        new.elementwise_affine = ln.elementwise_affine
        new.weight = ln.weight
        new.bias = ln.bias
        new.impl = impl
        object.__setattr__(new, "registry", registry)
        new.train(ln.training)
        return new

    def forward(self, x):
        if len(self.normalized_shape) != 1 or self.weight is None:
            return super().forward(x)
        if x.dtype != self.weight.dtype:  # a bf16 activation into an fp32-trained norm: statistics in fp32
            x = x.to(self.weight.dtype)
        return layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl, registry=self.registry)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl or 'auto'}"


__all__ = [
    "FusedLayerNorm", "KernelCall", "KernelImpl", "KernelInputError", "KernelUnavailableError", "clear_cache",
    "implementations", "layer_norm", "lora_linear", "prefix_attention", "resolve",
]
