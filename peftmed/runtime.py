"""Seeding and device choice: the one place every command (train, eval, bench, predict) gets them from."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch import nn

from .errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's CUDA device when there is one, else the CPU; any other name is checked."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r} is not a torch device (expected auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but this torch sees no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW as training uses it: torch's fused implementation where every tensor allows it (plain CPU or CUDA
    floating tensors: 8x faster per step on a CPU than the default), else the default one (e.g. a sharded model's
    DTensors)."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                  and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **options)


# ---- the base dtype a model was prepared in (peftmed.memory casts it; the model, tasks and deploy read it) --------
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The low-precision dtype the frozen base was cast to (None: fp32), wherever the marker sits."""
    for m in model.modules():
        name = getattr(m, "peftmed_base_dtype", None)
        if name is not None:
            return BASE_DTYPES[name] if name != "fp32" else None
    return None


def autocast_for(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """An autocast context in the model's base dtype (``dtype`` overrides it) on ``device``; a null
    context when the base is fp32 and no dtype is asked for."""
    dtype = dtype or base_dtype_of(model)
    if dtype is None:
        return contextlib.nullcontext()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.autocast(torch.device(device).type, dtype=dtype)
