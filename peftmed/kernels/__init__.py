"""Kernel ops used on the hot paths (the kernels issue replaces these bodies with dispatch).

Public API (stable; methods call these):
  lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False, impl=None)
  layer_norm(x, weight, bias, eps=1e-5, impl=None)
  FusedLayerNorm: an nn.LayerNorm drop-in that calls layer_norm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False, impl=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T  (A: (r, in), B: (out, r))."""
    y = F.linear(x, weight, bias)
    h = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
    return y + scaling * F.linear(F.linear(h, lora_a), lora_b)


def layer_norm(x, weight, bias, eps=1e-5, impl=None):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward goes through peftmed's layer_norm op (same parameters)."""

    impl: str | None = None

    @classmethod
    def from_module(cls, ln: nn.LayerNorm, impl: str | None = None) -> "FusedLayerNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = ln.normalized_shape
        new.eps = ln.eps
        new.elementwise_affine = ln.elementwise_affine
        new.weight = ln.weight
        new.bias = ln.bias
        new.impl = impl
        return new

    def forward(self, x):
        if len(self.normalized_shape) != 1 or self.weight is None:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)
