"""Seeding and device choice: the one place every command (train, eval, bench, predict) gets them from."""

from __future__ import annotations

import random

import numpy as np
import torch

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
