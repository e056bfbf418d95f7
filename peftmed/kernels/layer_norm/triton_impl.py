"""layer_norm in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests).

Forward: each program normalises BLOCK_M whole rows (a row fits one block: N <= impls.TRITON_MAX_WIDTH) and saves
mean and rstd in fp32. Backward: a fixed number of programs (a few per SM), each walking a contiguous
range of rows BLOCK_M at a time: it writes dx and keeps fp32 running sums of dy * xhat and dy in
registers, stored once as one partial row per program (stage 1); the partials are summed afterwards
(stage 2: one launch sums, casts and stores both, ``triton_reduce``). Unlike a lock-and-atomics dgamma
reduction, no program waits for another, and at the widths of ViT/BERT (768, 1024) several rows per step
keep enough loads in flight. Warps grow with the tile so that no thread holds more than 32 values of a
tile (the AOT report checks registers and spills at every width up to impls.TRITON_MAX_WIDTH). Row offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_reduce import on_gpu, reduce_partials, row_splits, sm_count


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(w_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rm, mean, mask=rm < M)
    tl.store(rstd_ptr + rm, rstd, mask=rm < M)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, pw_ptr, pb_ptr, M, N, rows_per_prog,
                NEED_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rn = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_end = tl.minimum(M, (pid + 1) * rows_per_prog)
    for m0 in range(pid * rows_per_prog, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask = (rm[:, None] < row_end) & (rn[None, :] < N)
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rm, mask=rm < row_end, other=0.0)
        rstd = tl.load(rstd_ptr + rm, mask=rm < row_end, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            g = dy * w[None, :]
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += tl.sum(dy * xhat, axis=0)
        acc_b += tl.sum(dy, axis=0)
    tl.store(pw_ptr + pid * 2 * N + rn, acc_w, mask=rn < N)  # partials (programs, 2, N): dw row, then db row
    tl.store(pb_ptr + pid * 2 * N + rn, acc_b, mask=rn < N)


def _rows_per_block(n_block: int) -> int:
    return max(1, min(16, 4096 // n_block))  # about 4k elements per step


def fwd_config(n: int) -> dict:
    """Tile and warps of the forward kernel for rows of ``n`` values: at most 32 values of a tensor per thread
    (it holds x, y and the weights)."""
    bn = triton.next_power_of_2(n)
    bm = _rows_per_block(bn)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=min(16, max(4, bm * bn // 1024)))


def bwd_config(n: int) -> dict:
    """The backward walks the same tiles with twice the warps: it holds about seven row tensors in registers
    (x, dy, x-hat, w, dx and the dw/db sums), at most 16 values each per thread. No spill up to N = 4096
    (impls.TRITON_MAX_WIDTH; at 8192 its 16 warps are capped at 128 registers and spill), and registers low
    enough for several blocks per SM."""
    cfg = fwd_config(n)
    cfg["num_warps"] = min(16, max(4, cfg["BLOCK_M"] * cfg["BLOCK_N"] // 512))
    return cfg


def forward(x, w, b, eps):
    m, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    cfg = fwd_config(n)
    _fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](x, w, b, y, mean, rstd, m, n, eps, **cfg)
    return y, mean, rstd


def _most_programs(x: torch.Tensor) -> int:
    # a few programs per SM on a GPU; the interpreter: few programs, each costs milliseconds
    return 4 * sm_count(x.device) if on_gpu(x) else 4


def backward(dy, x, w, mean, rstd, needs):
    need_dx, need_dw, need_db = needs
    m, n = x.shape
    cfg = bwd_config(n)
    bm = cfg["BLOCK_M"]
    progs, rows_per_prog = row_splits(m, bm, _most_programs(x))
    dx = torch.empty_like(x) if need_dx else x  # dx_ptr is not written when NEED_DX is false
    part = torch.empty(progs, 2, n, device=x.device, dtype=torch.float32)
    _bwd_kernel[(progs,)](dy, x, w, mean, rstd, dx, part, part[:, 1], m, n, rows_per_prog, NEED_DX=need_dx, **cfg)
    dw = db = None
    if need_dw or need_db:
        both = reduce_partials(part, torch.empty(2, n, device=x.device, dtype=w.dtype))  # stage 2, one launch
        dw, db = (both[0] if need_dw else None), (both[1] if need_db else None)
    return (dx if need_dx else None), dw, db
