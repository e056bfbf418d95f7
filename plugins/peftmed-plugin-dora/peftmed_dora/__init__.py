"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024), a peftmed method plugin.

The adapted weight is W' = m * (W + s B A) / ||W + s B A||, the norm taken per output feature (row of
the (out, in) weight): LoRA moves the direction, a trainable magnitude vector m (initialised to the
rows' norms of W, so the model starts unchanged) sets the length. DoRA is a variant of LoRA (peftmed's
``LoraVariant`` hook): it keeps LoRA's options, factors, initialisation and fused kernel, and adds the
magnitude, its forward and its merge. Written with peftmed's public API only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import peftmed
from peftmed.methods.lora import Lora, LoraConfig, LoraLinear, LoraVariant
from peftmed import kernels

__version__ = "0.1.0"


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's options (r, alpha, dropout, bias, rslora, init, kernel): the direction update is a LoRA."""


class DoraVariant(LoraVariant):
    label = "DoRA"
    tensors = ("lora_A", "lora_B", "magnitude")
    side_tables = ("_merge_norms",)  # the row norms used by merge, to unmerge exactly

    def init(self, layer, name, config) -> None:
        super().init(layer, name, config)
        weight = layer.innermost.weight
        layer.magnitude[name] = nn.Parameter(weight.detach().norm(dim=1).to(layer.lora_A[name].dtype))  # (out,)

    def _row_norm(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight + self.delta_weight(layer, name).to(weight.dtype)).norm(dim=1)  # (out,)

    def forward(self, layer, name, x):
        """(m / ||W + sBA||) * (x W^T + s B A dropout(x)) + b: the bracket is LoRA's fused op without the bias.
        The norm is a constant of the gradient (the paper's section 4.3, as peft computes it)."""
        cfg = layer.configs[name]
        weight = layer.base_layer.weight
        dt = peftmed.compute_dtype(x)
        scale = (layer.magnitude[name] / self._row_norm(layer, name, weight).detach()).to(dt)  # (out,)
        a, b = layer.lora_A[name].to(dt), layer.lora_B[name].to(dt)
        out = kernels.lora_linear(x.to(dt), weight.to(dt), None, a, b, cfg.scaling, dropout_p=cfg.dropout,
                                  training=layer.training, impl=cfg.kernel, registry=layer.kernel_registry)
        bias = layer.base_layer.bias
        return scale * out if bias is None else scale * out + bias.to(dt)

    def merge_into(self, layer, name, base) -> None:
        """W <- m * (W + sBA) / ||W + sBA||; the norm is kept to unmerge exactly (the layer keeps the bookkeeping:
        which adapters are merged, removal, refusal when stacked over another method)."""
        w = base.weight
        norm = self._row_norm(layer, name, w)
        layer._merge_norms[name] = norm
        w.copy_((layer.magnitude[name] / norm)[:, None] * (w + self.delta_weight(layer, name).to(w.dtype)))

    def unmerge_from(self, layer, name, base) -> None:
        w = base.weight
        norm = layer._merge_norms.pop(name)
        w.copy_(w * (norm / layer.magnitude[name])[:, None] - self.delta_weight(layer, name).to(w.dtype))


class DoraLinear(LoraLinear):
    """nn.Linear with per-adapter (A, B, magnitude)."""

    variant = DoraVariant()


class Dora(Lora):
    name = "dora"
    config_class = DoraConfig
    default_roles = ("attn.q", "attn.v", "attn.qkv")
    description = "DoRA: LoRA on the direction plus a trainable magnitude per output feature"
    short_label = "DoRA"
    identity_at_init = True  # B = 0 and m = ||W||: the adapted model starts as the base model
    layer_class = DoraLinear
    # peft's DoRA is LoRA with use_dora: the same forward (its norm a constant of the gradient too) and the magnitude
    # saved as lora_magnitude_vector; exported, imported and run as the bench's peft baseline through this form
    peft = dataclasses.replace(Lora.peft, tensors={**Lora.peft.tensors, "magnitude": "lora_magnitude_vector"},
                               trainable=(*Lora.peft.trainable, "lora_magnitude_vector."), selects={"use_dora": True})
    version = __version__

    def layer_class_for(self, module: nn.Module):
        return DoraLinear  # a convolution is refused by DoraLinear, naming the layer


@peftmed.hookimpl
def register_methods(register):
    register(Dora())
