"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024), a peftmed method plugin.

    y = W x + b + lambda_b * (B (lambda_d * (A x)))

A (r, in) and B (out, r) are random, frozen and shared: they are drawn from ``seed`` so that every
layer's pair is a slice of one pair of size (r, max in) and (max out, r), as in the paper; only the
vectors lambda_d (r,) and lambda_b (out,) are trained. Because A and B follow from the seed alone,
they are kept as non-persistent buffers: they are not parameters (never counted as trainable), not
in the adapter file (the seed in the saved config regenerates them on load), and identical on every
machine (drawn on the CPU in float32, then moved to the layer's device and dtype).

lambda_b starts at zero, so the adapted model starts as the base model. VeRA is a variant of LoRA (peftmed's
``LoraVariant`` hook): the layer, its bookkeeping and its additive merge are LoRA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import peftmed
from peftmed.methods.lora import LoraLinear, LoraVariant

__version__ = "0.1.0"


@dataclass
class VeraConfig(peftmed.MethodConfig):
    r: int = 256  # rank of the shared random matrices (VeRA uses a far higher rank than LoRA)
    seed: int = 0  # seed of the shared frozen matrices: saved instead of the matrices themselves
    d_initial: float = 0.1  # initial value of lambda_d
    dropout: float = 0.0  # dropout on the VeRA branch's input, in [0, 1)

    def validate(self) -> None:
        if self.r <= 0:
            raise peftmed.ConfigError(f"r must be a positive integer, got r={self.r}")
        if self.seed < 0:
            raise peftmed.ConfigError(f"seed must be >= 0, got seed={self.seed}")
        if not 0.0 <= self.dropout < 1.0:
            raise peftmed.ConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")


def shared_matrices(seed: int, r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen pair (A (r, in), B (out, r)) for one layer, in float32 on the CPU.

    Both are drawn row by row along the layer dimension (A transposed), so the pair of a smaller
    layer is exactly a slice of a larger layer's: one shared pair, without knowing the largest layer
    in advance. Kaiming-uniform bounds use r, which every layer shares.
    """
    bound = (3.0 / r) ** 0.5
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(in_features, r, generator=g) * 2 - 1) * bound  # (in, r): rows = input features
    g = torch.Generator().manual_seed(seed + 1)
    b = (torch.rand(out_features, r, generator=g) * 2 - 1) * bound  # (out, r)
    return a.t().contiguous(), b


class VeraVariant(LoraVariant):
    """VeRA as a variant of LoRA (peftmed's ``LoraVariant`` hook): the layer, its bookkeeping and additive merge are
    LoRA's; the low-rank pair is frozen and seeded, and what trains is two vectors."""

    label = "VeRA"
    tensors = ("vera_lambda_d", "vera_lambda_b")

    def init(self, layer, name, config) -> None:
        base = layer.innermost
        dev, dtype = base.weight.device, base.weight.dtype
        a, b = shared_matrices(config.seed, config.r, base.in_features, base.out_features)
        # buffers, not parameters: moved with the model, never trained, never saved (the seed is)
        layer.register_buffer(f"vera_A_{name}", a.to(dev, dtype), persistent=False)
        layer.register_buffer(f"vera_B_{name}", b.to(dev, dtype), persistent=False)
        layer.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), config.d_initial, device=dev, dtype=dtype))
        layer.vera_lambda_b[name] = nn.Parameter(torch.zeros(base.out_features, device=dev, dtype=dtype))

    def remove(self, layer, name) -> None:
        for key in (f"vera_A_{name}", f"vera_B_{name}"):
            layer._buffers.pop(key, None)

    def delta_weight(self, layer, name) -> torch.Tensor:
        """What merging adds to the base weight (the layer adds and subtracts it)."""
        a, b = layer.frozen_pair(name)
        return (layer.vera_lambda_b[name][:, None] * b) @ (layer.vera_lambda_d[name][:, None] * a)  # (out, in)

    def forward(self, layer, name, x) -> torch.Tensor:
        cfg = layer.configs[name]
        a, b = (t.to(x.dtype) for t in layer.frozen_pair(name))
        h = F.dropout(x, cfg.dropout, layer.training) if cfg.dropout > 0 else x
        low = F.linear(h, a) * layer.vera_lambda_d[name].to(x.dtype)  # (..., r)
        return layer.base_layer(x) + F.linear(low, b) * layer.vera_lambda_b[name].to(x.dtype)

    def describe(self, config) -> str:
        return f"r={config.r}, seed={config.seed}"


class VeraLinear(LoraLinear):
    """nn.Linear + per-adapter trainable vectors over frozen shared random matrices."""

    variant = VeraVariant()

    def frozen_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"vera_A_{name}"), getattr(self, f"vera_B_{name}")


class Vera(peftmed.Method):
    name = "vera"
    family = "inject"
    config_class = VeraConfig
    default_roles = ("attn.q", "attn.v", "attn.qkv")
    description = "VeRA: trainable scaling vectors over frozen random matrices shared by all layers (seeded)"
    short_label = "VeRA"
    mergeable = True
    identity_at_init = True  # lambda_b starts at zero
    layer_class = VeraLinear
    version = __version__


@peftmed.hookimpl
def register_methods(register):
    register(Vera())
