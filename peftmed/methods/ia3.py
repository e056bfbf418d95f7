"""IA3: learned per-channel scaling of keys, values and the feed-forward input (Liu et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError
from ..hookspecs import hookimpl
from .base import AdapterLayer, Method, MethodConfig, PeftForm, peft_targets, unwrap


@dataclass
class IA3Config(MethodConfig):
    # roles scaled on their input, not output: the output projections of attention and FFN (peft's BERT
    # default, "output.dense" as feedforward), so the vector has the projection's input width
    feedforward_roles: tuple[str, ...] = ("mlp.down", "attn.o", "cross.o")


class IA3Linear(AdapterLayer):
    """y = W (x * l) + b for feed-forward roles; y = (W x + b) * l otherwise. l starts at 1."""

    adapter_attributes = ("ia3_scale",)
    adapter_side_tables = ("on_input",)

    def __init__(self, base_layer: nn.Module):
        if not isinstance(unwrap(base_layer), nn.Linear):
            raise RecipeError(f"IA3 wraps nn.Linear layers; got {type(unwrap(base_layer)).__name__}")
        super().__init__(base_layer)
        self.ia3_scale = nn.ParameterDict()
        self.on_input: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config, role: str) -> None:
        base = self.innermost
        on_input = role in config.feedforward_roles
        size = base.in_features if on_input else base.out_features
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # fp32 over a half base
        self.ia3_scale[name] = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=dtype))
        self.on_input[name] = on_input
        self.configs[name] = config
        self.roles[name] = role

    def merge_into(self, name: str, base: nn.Module) -> None:
        """Scale the weight's input columns (feed-forward roles) or output rows and bias."""
        scale = self.ia3_scale[name].detach()
        if self.on_input[name]:
            base.weight.mul_(scale[None, :])
        else:
            base.weight.mul_(scale[:, None])
            if base.bias is not None:
                base.bias.mul_(scale)

    def unmerge_from(self, name: str, base: nn.Module) -> None:
        scale = self.ia3_scale[name].detach()
        if self.on_input[name]:
            base.weight.div_(scale[None, :])
        else:
            base.weight.div_(scale[:, None])
            if base.bias is not None:
                base.bias.div_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.uses(name):
            return self.base_layer(x)
        scale = self.ia3_scale[name].to(x.dtype)
        if self.on_input[name]:
            return self.base_layer(x * scale)
        return self.base_layer(x) * scale


def _peft_info(layer, config, peft_config, module) -> dict:
    """Whether the module is scaled on its input (peft: a feed-forward module, its vector (1, in))."""
    if peft_config is None:
        on_input = layer.on_input
        return {"feedforward": bool(on_input["default"] if "default" in on_input else next(iter(on_input.values())))}
    return {"feedforward": peft_targets(peft_config.get("feedforward_modules"), module)}


def _to_peft(attribute: str, t: torch.Tensor, info: dict) -> torch.Tensor:
    return t.reshape(1, -1) if info["feedforward"] else t.reshape(-1, 1)


class IA3(Method):
    name = "ia3"
    family = "inject"
    config_class = IA3Config
    # keys, values and outputs of the self- and cross-attention, and the FFN output (huggingface/peft's BERT
    # default: key, value, output.dense; what the MILE paper counts)
    default_roles = ("attn.k", "attn.v", "attn.o", "cross.k", "cross.v", "cross.o", "mlp.down")
    description = "IA3: learned scaling vectors on keys, values and feed-forward activations"
    short_label = "IA3"
    default_lr = 3e-3
    mergeable = True
    identity_at_init = True  # scales start at one; the conformance kit checks the promise
    layer_class = IA3Linear
    peft = PeftForm("IA3", tensors={"ia3_scale": "ia3_l"}, trainable=("ia3_l.",),
                    config=lambda configs, info: {"feedforward_modules": sorted(m for m, i in info.items()
                                                                                if i["feedforward"])},
                    info=_peft_info, to_peft=_to_peft, from_peft=lambda attribute, t, info: t.reshape(-1),
                    role_subsets={"feedforward_roles": "feedforward"})


@hookimpl
def register_methods(register):
    register(IA3())
