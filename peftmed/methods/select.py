"""Select-family methods: unfreeze existing parameters chosen by role.

LayerNorm-tuning (Chen et al., ACM MM 2024: ~0.04% of MISS), FFN-tuning, Attention-tuning, BitFit,
full fine-tuning, and ``frozen`` (explicitly nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import kernels
from ..hookspecs import hookimpl
from .base import ApplyContext, Method, MethodConfig, PeftForm, canonical_name, unwrap


def _params_of(ctx: ApplyContext, modules: dict[str, nn.Module], *, bias_only: bool = False) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for name, module in modules.items():
        for pname, p in unwrap(module).named_parameters():
            if bias_only and not pname.endswith("bias"):
                continue
            out[canonical_name(f"{name}.{pname}")] = p
    return out


class SelectMethod(Method):
    family = "select"

    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        return _params_of(ctx, {n: m for n, (m, _) in ctx.matched().items()})


@dataclass
class LayerNormConfig(MethodConfig):
    fused: bool = True  # route the tuned LayerNorms through peftmed's fused layer_norm op
    kernel: str = "auto"  # layer_norm implementation: auto | triton | cuda | cpp | torch


class LayerNormTuning(SelectMethod):
    name = "layernorm"
    config_class = LayerNormConfig
    default_roles = ("norm",)
    description = "LayerNorm-tuning: train only the gains and biases of normalisation layers"
    aliases = ("ln", "ln-tuning")
    short_label = "LN"
    default_lr = 1e-3
    # peft's LN_TUNING holds a trained copy of each norm's weight and bias
    peft = PeftForm("LN_TUNING", tensors={"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"},
                    trainable=("ln_tuning_layers.",))

    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        matched = ctx.matched()
        if ctx.config.fused:
            # swap module instances in this model only (never patch nn.LayerNorm process-wide)
            for name, (module, _) in matched.items():
                if type(module) is nn.LayerNorm and module.elementwise_affine:
                    fused = kernels.FusedLayerNorm.from_module(module, impl=ctx.config.kernel, registry=ctx.registry)
                    ctx.model.set_submodule(name, fused)
                    matched[name] = (fused, "norm")
        return _params_of(ctx, {n: m for n, (m, _) in matched.items()})


class FFNTuning(SelectMethod):
    name = "ffn"
    config_class = MethodConfig
    default_roles = ("mlp.up", "mlp.down")
    description = "FFN-tuning: train the feed-forward layers (weights and biases)"
    short_label = "FFN"
    default_lr = 1e-4


@dataclass
class AttentionConfig(MethodConfig):
    cross: bool = True  # also train cross-attention projections where the component has them


class AttentionTuning(SelectMethod):
    name = "attention"
    config_class = AttentionConfig
    default_roles = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")
    description = "Attention-tuning: train the attention projections (weights and biases)"
    aliases = ("attn",)
    short_label = "Attn"
    default_lr = 1e-4

    def roles_for(self, config: AttentionConfig) -> tuple[str, ...]:
        if config.roles:
            return tuple(config.roles)
        extra = ("cross.q", "cross.k", "cross.v", "cross.o") if config.cross else ()
        return self.default_roles + extra


class BitFit(SelectMethod):
    name = "bitfit"
    config_class = MethodConfig
    description = "BitFit: train only the bias terms"
    short_label = "BitFit"
    default_lr = 1e-3

    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        if ctx.config.roles:
            return _params_of(ctx, {n: m for n, (m, _) in ctx.matched().items()}, bias_only=True)
        return {n: p for n, p in ctx.base_parameters().items() if n.endswith("bias")}


class Full(SelectMethod):
    name = "full"
    config_class = MethodConfig
    description = "Full fine-tuning of the component (the papers' T)"
    aliases = ("t", "all")
    short_label = "T"
    default_lr = 1e-4
    peft = PeftForm("", modules_to_save=True, refusal="full tuning has no adapter; peft keeps such a component as "
                                                      "modules_to_save beside another method's adapter")

    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        if ctx.config.roles:
            return super().select(ctx)
        return ctx.base_parameters()


class Frozen(SelectMethod):
    name = "frozen"
    config_class = MethodConfig
    description = "Nothing trained in the component (the papers' F)"
    aliases = ("f", "none")
    short_label = "F"
    trains_nothing = True

    def select(self, ctx: ApplyContext) -> dict[str, nn.Parameter]:
        return {}


@hookimpl
def register_methods(register):
    for cls in (LayerNormTuning, FFNTuning, AttentionTuning, BitFit, Full, Frozen):
        register(cls())
