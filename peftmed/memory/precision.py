"""A frozen base in bf16 or fp16, trainable tensors in fp32 (``--base-dtype``).

What a 7B model needs to fit on one GPU: its frozen weights at 2 bytes each, while everything the
optimizer updates (adapters, tuned norms or biases, a fully tuned component) stays fp32, as do the
optimizer's states. Casting the whole model to fp32 and relying on autocast would put a 7B model at
28 GB before training starts.

Rules:
- trainable floating tensors: fp32 (also when a checkpoint was loaded in bf16);
- frozen weights of everything else: the base dtype;
- frozen normalisation layers stay fp32 (a few thousand values per layer; CPU kernels refuse a bf16
  norm on an fp32 input, and fp32 statistics are what mixed-precision training keeps anyway);
- 4-bit layers (``quantize``) are left as they are.

Training and evaluation then run under ``torch.autocast`` in the base dtype (on a CPU as on a GPU):
see :func:`autocast_for`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime import BASE_DTYPES, autocast_for, base_dtype_of  # noqa: F401  (the model-level half lives there)

_NAMES = {v: k for k, v in BASE_DTYPES.items()}


def parse_base_dtype(value) -> torch.dtype | None:
    """``bf16`` / ``fp16`` / ``fp32`` (or a torch dtype) -> torch dtype; None and ``fp32`` mean no casting."""
    if value is None or isinstance(value, torch.dtype) and value == torch.float32:
        return None
    if isinstance(value, torch.dtype):
        if value in _NAMES:
            return value
        raise ConfigError(f"base dtype must be one of {sorted(BASE_DTYPES)}, got {value}")
    text = str(value).strip().lower().replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32")
    if text not in BASE_DTYPES:
        raise ConfigError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {value!r}")
    return None if text == "fp32" else BASE_DTYPES[text]


def resolve_base_dtype(value, model: nn.Module) -> torch.dtype | None:
    """``auto``: the dtype holding most of the model's floating weights (a bf16 checkpoint stays bf16; None
    for fp32); anything else as :func:`parse_base_dtype`."""
    if value not in (None, "auto"):
        return parse_base_dtype(value)
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if not sizes:
        return None
    dominant = max(sizes, key=sizes.get)
    return dominant if dominant in (torch.bfloat16, torch.float16) else None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _is_quantized(p: torch.Tensor) -> bool:
    return not p.is_floating_point() or type(p).__name__ == "Params4bit"


def set_base_dtype(model: nn.Module, dtype) -> dict[str, int]:
    """Cast ``model`` in place by the rules above; returns counts of values per resulting dtype."""
    dtype = parse_base_dtype(dtype)
    counts = {"trainable fp32": 0, "frozen": 0, "frozen norms fp32": 0}
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in seen or _is_quantized(p):
                continue
            seen.add(id(p))
            if p.requires_grad:
                target, key = torch.float32, "trainable fp32"
            elif norm or dtype is None:
                target, key = torch.float32, "frozen norms fp32" if norm else "frozen"
            else:
                target, key = dtype, "frozen"
            if p.dtype != target:
                p.data = p.data.to(target)
            counts[key] += p.numel()
    model.peftmed_base_dtype = _NAMES.get(dtype, "fp32") if dtype is not None else "fp32"
    return counts


