"""Stage 2 of the kernels' fp32 reductions in one launch (and stage 1's split of the rows over programs): the partial rows every program wrote (stage 1)
summed, scaled, cast and stored in the output's layout (e.g. transposed), instead of a torch sum, a multiply,
a transpose and a cast (four launches and three temporaries)."""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
import triton.language as tl


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, S, R, N, s_or, s_on, scale, BLOCK_N: tl.constexpr):
    """out[r, n] (at r * s_or + n * s_on) = scale * sum_s part[s, r, n] (part contiguous (S, R, N), fp32)."""
    r = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + (s * R + r).to(tl.int64) * N + rn, mask=rn < N, other=0.0)
    tl.store(out_ptr + r.to(tl.int64) * s_or + rn.to(tl.int64) * s_on, (acc * scale).to(out_ptr.dtype.element_ty),
             mask=rn < N)


_SMS: dict[int, int] = {}
# set by as_gpu(): the SM count and compute capability of the GPU that meta tensors stand for
_AS_GPU: contextvars.ContextVar[tuple[int, tuple[int, int]] | None] = contextvars.ContextVar("peftmed_as_gpu",
                                                                                            default=None)


@contextlib.contextmanager
def as_gpu(sms: int = 132, capability: tuple[int, int] = (9, 0)):
    """Within it the launchers take meta tensors for tensors on a GPU of ``sms`` SMs and this compute capability
    (an H100's by default): they choose tiles, grids and splits as they would there (the AOT report records the
    launches they make so, with no GPU)."""
    token = _AS_GPU.set((sms, tuple(capability)))
    try:
        yield
    finally:
        _AS_GPU.reset(token)


def on_gpu(t: torch.Tensor) -> bool:
    """Whether a launcher given ``t`` launches for a GPU (a CUDA tensor, or a meta tensor within as_gpu)."""
    return t.device.type == "cuda" or (t.device.type == "meta" and _AS_GPU.get() is not None)


def sm_count(device: torch.device) -> int:
    """The GPU's number of SMs (cached: the launchers ask on every call)."""
    if device.type == "meta" and _AS_GPU.get() is not None:
        return _AS_GPU.get()[0]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability (cached); a meta tensor within ``as_gpu`` stands for that GPU's."""
    if device.type == "meta" and _AS_GPU.get() is not None:
        return _AS_GPU.get()[1]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def row_splits(m: int, block_m: int, most: int) -> tuple[int, int]:
    """Stage 1's split of m rows: at most ``most`` programs, each a whole number of ``block_m`` rows; returns
    (programs, rows each)."""
    splits = max(1, min(triton.cdiv(m, block_m), most))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    return triton.cdiv(m, rows_per_split), rows_per_split


def reduce_partials(part: torch.Tensor, out: torch.Tensor, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """Write ``scale * part.sum(0)`` ((R, N), or its transpose (N, R) with ``transpose``) into ``out``."""
    s, r, n = part.shape
    s_or, s_on = (out.stride(1), out.stride(0)) if transpose else (out.stride(0), out.stride(1))
    block = 256 if on_gpu(part) else 64
    _reduce_kernel[(triton.cdiv(n, block), r)](part, out, s, r, n, s_or, s_on, float(scale), BLOCK_N=block)
    return out
