"""LoRA: low-rank updates W + s * B A on linear layers (the reference inject-family plugin).

A third party writing an inject method copies this file: a config dataclass, an AdapterLayer
subclass, a Method subclass, and one ``register_methods`` hook implementation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError, RecipeError
from ..hookspecs import hookimpl
from .base import (AdapterLayer, ApplyContext, Method, MethodConfig, PeftForm, canonical_name, compute_dtype,
                   pattern_value, unwrap)

INITS = ("kaiming", "gaussian", "orthogonal")
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8  # rank of the update
    alpha: float = 8.0  # scaling numerator: s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the LoRA branch's input, in [0, 1)
    bias: str = "none"  # none | all (train every bias of the component) | lora_only (biases of wrapped layers)
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    init: str = "kaiming"  # kaiming (A kaiming-uniform, B zero) | gaussian (A ~ N(0, 1/r)) | orthogonal
    kernel: str = "auto"  # lora_linear implementation: auto | triton | cuda | cpp | torch

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got r={self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got bias={self.bias!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got init={self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _factors(weight: torch.Tensor, config: LoraConfig, fan_in: int, out: int, kernel: tuple[int, ...] = ()):
    """LoRA's A (r, fan_in) and B (out, r), shaped (r, in, *kernel) and (out, r, 1, 1) for a convolution."""
    if config.r > min(fan_in, out):
        raise RecipeError(f"LoRA rank r={config.r} exceeds this layer's size ({fan_in} -> {out}): a rank above "
                          f"min(in, out) = {min(fan_in, out)} adds parameters and no expressiveness")
    dev = weight.device
    # adapters are fp32 over a bf16, fp16 or 4-bit base (as peft's autocast_adapter_dtype): a half-precision
    # factor would round every update away; the forward casts them to the compute dtype
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a = torch.empty(config.r, fan_in, device=dev, dtype=dtype)
    if config.init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif config.init == "gaussian":
        nn.init.normal_(a, std=1.0 / config.r)
    else:
        nn.init.orthogonal_(a)
    b = torch.zeros(out, config.r, *((1,) * len(kernel)), device=dev, dtype=dtype)
    if kernel:
        a = a.reshape(config.r, fan_in // math.prod(kernel), *kernel)
    return nn.Parameter(a), nn.Parameter(b)


class LoraVariant:
    """What a variant of LoRA on linear layers changes (peft's LoRA variants are the model: DoRA is one; VeRA, a
    frozen seeded pair with trained vectors, is another). A plugin subclasses it, binds it to a layer class
    (``class DoraLinear(LoraLinear): variant = DoraVariant()``) and names that class in its Method's
    ``layer_class``. The layer keeps what every variant shares: it wraps nn.Linear only, keeps per-adapter
    configs and roles, the active adapter, merging's bookkeeping and removal; the variant says what differs:

    - ``tensors``: the layer's per-adapter ``nn.ParameterDict`` attributes (trained, counted, saved);
      ``side_tables``: per-adapter dicts kept outside them (removed with the adapter);
    - ``init(layer, name, config)``: make the adapter's tensors (and any frozen buffers);
    - ``forward(layer, name, x)``: the layer's output while the adapter applies;
    - ``delta_weight(layer, name)``: the additive update merging folds into W; or ``merge_into`` /
      ``unmerge_from`` where merging is not an addition (DoRA renormalises);
    - ``remove(layer, name)``: drop what ``init`` made outside ``tensors`` and ``side_tables``;
    - ``describe(config)``: the layer's repr per adapter.
    """

    label = "LoRA"
    tensors: tuple[str, ...] = ("lora_A", "lora_B")
    side_tables: tuple[str, ...] = ()

    def init(self, layer: LoraLinear, name: str, config) -> None:
        base = layer.innermost
        layer.lora_A[name], layer.lora_B[name] = _factors(base.weight, config, base.in_features, base.out_features)

    def delta_weight(self, layer: LoraLinear, name: str) -> torch.Tensor:
        """s B A (out, in)."""
        return (layer.lora_B[name] @ layer.lora_A[name]) * layer.configs[name].scaling

    def forward(self, layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
        """Through the fused ``lora_linear`` op; stacked over another method or over 4-bit weights only the base
        layer can read, the update is added to the base layer's output."""
        cfg = layer.configs[name]
        dt = compute_dtype(x)
        a, b = layer.lora_A[name], layer.lora_B[name]
        if a.dtype != dt or b.dtype != dt:  # a cast only where the dtypes differ (autocast; fp32 factors, bf16 base)
            a, b = a.to(dt), b.to(dt)
        base = layer.base_layer
        if isinstance(base, AdapterLayer) or layer.quantized:
            h = x.to(dt)
            h = nn.functional.dropout(h, cfg.dropout, layer.training) if cfg.dropout > 0 else h
            return base(x) + cfg.scaling * (h @ a.t()) @ b.t()
        w, bias = base.weight, base.bias
        if w.dtype != dt:
            w = w.to(dt)
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        return kernels.lora_linear(
            x if x.dtype == dt else x.to(dt), w, bias, a, b, cfg.scaling,
            dropout_p=cfg.dropout, training=layer.training, impl=cfg.kernel, registry=layer.kernel_registry,
        )

    def merge_into(self, layer: LoraLinear, name: str, base: nn.Module) -> None:
        AdapterLayer.merge_into(layer, name, base)  # the shared additive merge of ``delta_weight``

    def unmerge_from(self, layer: LoraLinear, name: str, base: nn.Module) -> None:
        AdapterLayer.unmerge_from(layer, name, base)

    def remove(self, layer: LoraLinear, name: str) -> None:
        pass

    def describe(self, config) -> str:
        return f"r={config.r}, alpha={config.alpha}"


class LoraLinear(AdapterLayer):
    """nn.Linear + per-adapter low-rank update; what the update is and how it is applied is ``variant``'s (plain
    LoRA: forward through the fused ``lora_linear`` op). A subclass that sets another ``variant`` gets its
    ``tensors`` and ``side_tables`` as the layer's adapter attributes."""

    variant: ClassVar[LoraVariant] = LoraVariant()
    adapter_attributes = LoraVariant.tensors

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.adapter_attributes = tuple(cls.variant.tensors)
        cls.adapter_side_tables = tuple(cls.variant.side_tables)

    def __init__(self, base_layer: nn.Module):
        if not isinstance(unwrap(base_layer), nn.Linear):
            raise RecipeError(
                f"{self.variant.label} wraps nn.Linear layers; got {type(unwrap(base_layer)).__name__}. "
                f"Choose roles that name linear layers."
            )
        super().__init__(base_layer)
        for attr in self.adapter_attributes:
            setattr(self, attr, nn.ParameterDict())
        for attr in self.adapter_side_tables:
            setattr(self, attr, {})

    def add_adapter(self, name: str, config: MethodConfig, role: str) -> None:
        self.variant.init(self, name, config)
        self.configs[name] = config
        self.roles[name] = role

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adds to the base weight (the base class does the bookkeeping)."""
        return self.variant.delta_weight(self, name)

    def merge_into(self, name: str, base: nn.Module) -> None:
        self.variant.merge_into(self, name, base)

    def unmerge_from(self, name: str, base: nn.Module) -> None:
        self.variant.unmerge_from(self, name, base)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.variant.remove(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.uses(name):
            return self.base_layer(x)
        return self.variant.forward(self, name, x)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.variant.describe(c)}" for n, c in self.configs.items())


class LoraConv2d(AdapterLayer):
    """nn.Conv2d (a ViT/CLIP patch embedding) + a low-rank update: A is a convolution to r channels with
    the base's kernel, stride and padding, B a 1x1 convolution back (peft's layout: A (r, in, kh, kw),
    B (out, r, 1, 1)); merging adds s * B A reshaped to the kernel."""

    adapter_attributes = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        conv = unwrap(base_layer)
        if not isinstance(conv, nn.Conv2d):
            raise RecipeError(f"LoraConv2d wraps nn.Conv2d layers; got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise RecipeError(f"LoRA on a convolution needs groups=1 and zero padding; this one has "
                              f"groups={conv.groups}, padding_mode={conv.padding_mode!r}")
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def add_adapter(self, name: str, config: LoraConfig, role: str) -> None:
        base = self.innermost
        kernel = tuple(base.kernel_size)
        self.lora_A[name], self.lora_B[name] = _factors(base.weight, config, base.in_channels * math.prod(kernel),
                                                        base.out_channels, kernel)
        self.configs[name] = config
        self.roles[name] = role

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a) * self.configs[name].scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.uses(name):
            return self.base_layer(x)
        cfg, conv = self.configs[name], self.innermost
        dt = compute_dtype(x)
        h = x.to(dt)
        h = nn.functional.dropout(h, cfg.dropout, self.training) if cfg.dropout > 0 else h
        h = nn.functional.conv2d(h, self.lora_A[name].to(dt), None, conv.stride, conv.padding, conv.dilation)
        return self.base_layer(x) + cfg.scaling * nn.functional.conv2d(h, self.lora_B[name].to(dt))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={c.r}, alpha={c.alpha}" for n, c in self.configs.items())


def _peft_config(configs: dict, info: dict) -> dict:
    """peft's LoraConfig fields: the most common rank and alpha, and per-module patterns for the rest."""
    first = next(iter(configs.values()))
    ranks, alphas = Counter(c["r"] for c in configs.values()), Counter(c["alpha"] for c in configs.values())
    # bias="all" / "lora_only": peft trains the base biases too (an exported adapter has no place for them)
    return {"r": ranks.most_common(1)[0][0], "lora_alpha": alphas.most_common(1)[0][0],
            "lora_dropout": first["dropout"], "use_rslora": first["rslora"], "bias": first.get("bias", "none"),
            "rank_pattern": {m: c["r"] for m, c in configs.items()},
            "alpha_pattern": {m: c["alpha"] for m, c in configs.items()}}


def _peft_info(layer, config, peft_config, module) -> dict:
    if peft_config is None:
        return {}
    return {"r": pattern_value(peft_config.get("rank_pattern"), module, peft_config["r"]),
            "alpha": pattern_value(peft_config.get("alpha_pattern"), module, peft_config["lora_alpha"])}


def _peft_options(peft_config: dict, infos: list) -> dict:
    ranks, alphas = {i["r"] for i in infos}, {i["alpha"] for i in infos}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ConfigError(f"LoRA modules of one component have different ranks {sorted(ranks)} or alphas "
                          f"{sorted(alphas)}; peftmed uses one per component")
    return {"r": ranks.pop(), "alpha": float(alphas.pop()), "dropout": float(peft_config.get("lora_dropout", 0.0)),
            "rslora": bool(peft_config.get("use_rslora", False))}


class Lora(Method):
    name = "lora"
    family = "inject"
    config_class = LoraConfig
    # query and value of the self- and cross-attention (what huggingface/peft's BERT default targets and the
    # MILE paper counts); roles a backbone lacks (a ViT has no cross-attention) are simply not there
    default_roles = ("attn.q", "attn.v", "attn.qkv", "cross.q", "cross.v")
    description = "LoRA: trainable low-rank update B A added to frozen linear weights"
    short_label = "LoRA"
    default_lr = 1e-3
    mergeable = True
    identity_at_init = True  # B starts at zero; the conformance kit checks the promise
    layer_class = LoraLinear
    peft = PeftForm("LORA", tensors={"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
                    trainable=("lora_A.", "lora_B."), config=_peft_config, info=_peft_info, options=_peft_options,
                    selects={"use_dora": False})

    def layer_class_for(self, module: nn.Module) -> type[AdapterLayer]:
        """LoraConv2d for a convolution (the ``patch`` role), LoraLinear otherwise."""
        return LoraConv2d if isinstance(unwrap(module), nn.Conv2d) else LoraLinear

    def extra_parameters(self, ctx: ApplyContext, layers) -> dict[str, nn.Parameter]:
        cfg: LoraConfig = ctx.config
        if cfg.bias == "none":
            return {}
        if cfg.bias == "lora_only":
            return {
                f"{canonical_name(n)}.bias": layer.innermost.bias
                for n, layer in layers.items()
                if getattr(layer.innermost, "bias", None) is not None
            }
        return {n: p for n, p in ctx.base_parameters().items() if n.endswith("bias")}


@hookimpl
def register_methods(register):
    register(Lora())
