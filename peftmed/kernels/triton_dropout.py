"""The seeded dropout hash of peftmed.kernels.dropout, as Triton functions shared by the kernels.

Every implementation (torch, C++, CUDA, Triton) regenerates the same keep mask from (seed, row, col),
so no mask is stored and switching implementations does not change training.
"""

import triton
import triton.language as tl


@triton.jit
def mix32(h):
    h ^= h >> 16
    h = h * 0x7FEB352D
    h ^= h >> 15
    h = h * 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(rows, cols, key, thr):
    """(rows[:, None], cols[None, :]) -> keep mask, the same hash as peftmed.kernels.dropout."""
    rk = mix32(rows.to(tl.uint32) ^ key.to(tl.uint32))
    u = mix32(rk[:, None] + cols.to(tl.uint32)[None, :] * 0x9E3779B1)
    return (u >> 8) >= thr
