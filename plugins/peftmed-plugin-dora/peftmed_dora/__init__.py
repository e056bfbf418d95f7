"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024), a peftmed method plugin.

The adapted weight is W' = m * (W + s B A) / ||W + s B A||, the norm taken per output feature (row of
the (out, in) weight): LoRA moves the direction, a trainable magnitude vector m (initialised to the
rows' norms of W, so the model starts unchanged) sets the length. Written with peftmed's public API
only, following the structure of the built-in LoRA: a config dataclass, an AdapterLayer subclass, a
Method subclass, and one ``register_methods`` hook implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import peftmed

__version__ = "0.1.0"


@dataclass
class DoraConfig(peftmed.MethodConfig):
    r: int = 8  # rank of the direction update B A
    alpha: float = 8.0  # scaling numerator: s = alpha / r
    dropout: float = 0.0  # dropout on the low-rank branch's input, in [0, 1)

    def validate(self) -> None:
        if self.r <= 0:
            raise peftmed.ConfigError(f"r must be a positive integer, got r={self.r}")
        if self.alpha <= 0:
            raise peftmed.ConfigError(f"alpha must be > 0, got alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise peftmed.ConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class DoraLinear(peftmed.AdapterLayer):
    """nn.Linear with per-adapter (A, B, magnitude); y = (m / ||W + sBA||) * (x W^T + s B A x) + b."""

    adapter_attributes = ("lora_A", "lora_B", "magnitude")
    adapter_side_tables = ("_merge_norms",)

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, nn.Linear):
            raise peftmed.RecipeError(
                f"DoRA wraps nn.Linear layers; got {type(base_layer).__name__}. Choose roles that name linear layers."
            )
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.magnitude = nn.ParameterDict()
        self._merge_norms: dict[str, torch.Tensor] = {}  # the row norms used by merge, to unmerge exactly

    def add_adapter(self, name: str, config: DoraConfig, role: str) -> None:
        weight = self.base_layer.weight
        a = torch.empty(config.r, weight.shape[1], device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(weight.shape[0], config.r, device=weight.device, dtype=weight.dtype))
        self.magnitude[name] = nn.Parameter(weight.detach().norm(dim=1).clone())  # (out,): start unchanged
        self.configs[name] = config
        self.roles[name] = role

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name] @ self.lora_A[name]) * self.configs[name].scaling  # (out, in)

    def _row_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight + self.delta_weight(name).to(weight.dtype)).norm(dim=1)  # (out,)

    def merge_into(self, name: str, base: nn.Module) -> None:
        """W <- m * (W + sBA) / ||W + sBA||; the norm is kept to unmerge exactly (the base class keeps
        the bookkeeping: which adapters are merged, removal, refusal when stacked over another method)."""
        w = base.weight
        norm = self._row_norm(name, w)
        self._merge_norms[name] = norm
        w.copy_((self.magnitude[name] / norm)[:, None] * (w + self.delta_weight(name).to(w.dtype)))

    def unmerge_from(self, name: str, base: nn.Module) -> None:
        w = base.weight
        norm = self._merge_norms.pop(name)
        w.copy_(w * (norm / self.magnitude[name])[:, None] - self.delta_weight(name).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.uses(name):
            return self.base_layer(x)
        cfg = self.configs[name]
        weight = self.base_layer.weight
        a, b = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        scale = self.magnitude[name].to(x.dtype) / self._row_norm(name, weight).to(x.dtype)  # (out,)
        h = F.dropout(x, cfg.dropout, self.training) if cfg.dropout > 0 else x
        # split form: the dropout of the low-rank branch does not touch the base product (as in LoRA)
        out = scale * (F.linear(x, weight) + cfg.scaling * F.linear(F.linear(h, a), b))
        bias = self.base_layer.bias
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={c.r}, alpha={c.alpha}" for n, c in self.configs.items())


class Dora(peftmed.Method):
    name = "dora"
    family = "inject"
    config_class = DoraConfig
    default_roles = ("attn.q", "attn.v", "attn.qkv")
    description = "DoRA: LoRA on the direction plus a trainable magnitude per output feature"
    short_label = "DoRA"
    mergeable = True
    identity_at_init = True  # B = 0 and m = ||W||: the adapted model starts as the base model
    layer_class = DoraLinear
    version = __version__


@peftmed.hookimpl
def register_methods(register):
    register(Dora())
