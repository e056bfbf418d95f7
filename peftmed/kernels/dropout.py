"""The dropout mask every implementation regenerates from a seed instead of storing it.

keep(row, col) is a counter-based hash of (seed, row, col), the same integer arithmetic in torch,
C++, CUDA and Triton, so every implementation drops the same elements for the same seed (switching
implementation does not change training) and backward recomputes the mask instead of saving it:

    k   = mix32(seed ^ 0x9E3779B9)
    rk  = mix32(row ^ k)                      # once per row
    u   = mix32((rk + col * 0x9E3779B1) mod 2^32)
    keep = (u >> 8) >= round(p * 2^24)        # P(drop) = p to 2^-24

mix32 is the "lowbias32" integer finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
MIX1, MIX2, GOLDEN, SEED_SALT = 0x7FEB352D, 0x846CA68B, 0x9E3779B1, 0x9E3779B9


def threshold(p: float) -> int:
    """The 24-bit integer threshold: an element is dropped when (hash >> 8) < threshold."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * (1 << 24))), 1 << 24)


def mix32_int(h: int) -> int:
    """mix32 on a Python int (for the per-call seed key)."""
    h &= M32
    h ^= h >> 16
    h = (h * MIX1) & M32
    h ^= h >> 15
    h = (h * MIX2) & M32
    h ^= h >> 16
    return h


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2^32 on int64 without signed overflow: split c into 16-bit halves
    lo = h * (c & 0xFFFF)
    hi = (h * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, MIX1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX2)
    return h ^ (h >> 16)


def seed_key(seed: int) -> int:
    return mix32_int((seed & M32) ^ SEED_SALT)


# The hash runs on int64 tensors (torch has no wrapping uint32 multiply), about six (rows, cols) int64
# temporaries deep: rows are hashed this many elements at a time, so the transient memory stays a few
# MB however large the mask (a (B*H*Tq, P+Tk) attention mask at batch 32 would otherwise need ~30 MB).
MASK_CHUNK_ELEMENTS = 1 << 18


def keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """(rows, cols) bool tensor: True where the element is kept."""
    key, thr = seed_key(seed), threshold(p)
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    colh = _mul32(torch.arange(cols, device=device, dtype=torch.int64), GOLDEN)[None, :]
    step = max(1, MASK_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        row = torch.arange(r0, min(r0 + step, rows), device=device, dtype=torch.int64)
        u = _mix32((_mix32(row ^ key)[:, None] + colh) & M32)  # (chunk, cols)
        torch.ge(u >> 8, thr, out=out[r0:r0 + step])
    return out


def new_seed() -> int:
    """A seed drawn from torch's default generator, so torch.manual_seed makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
