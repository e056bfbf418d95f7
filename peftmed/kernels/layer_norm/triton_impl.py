"""layer_norm in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests).

Forward: each program normalises BLOCK_M whole rows (a row fits one block: N <= 65536) and saves
mean and rstd in fp32. Backward: a fixed number of programs (a few per SM), each walking a contiguous
range of rows BLOCK_M at a time: it writes dx and keeps fp32 running sums of dy * xhat and dy in
registers, stored once as one partial row per program (stage 1); the partials are summed afterwards
(stage 2). Unlike a lock-and-atomics dgamma reduction, no program waits for another, and at the
widths of ViT/BERT (768, 1024) several rows per step keep enough loads in flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
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
        offs = rm[:, None] * N + rn[None, :]
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
    tl.store(pw_ptr + pid * N + rn, acc_w, mask=rn < N)
    tl.store(pb_ptr + pid * N + rn, acc_b, mask=rn < N)


def _rows_per_block(n_block: int) -> int:
    return max(1, min(16, 4096 // n_block))  # about 4k elements per step


def forward(x, w, b, eps):
    m, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    bn = triton.next_power_of_2(n)
    bm = _rows_per_block(bn)
    _fwd_kernel[(triton.cdiv(m, bm),)](x, w, b, y, mean, rstd, m, n, eps, BLOCK_M=bm, BLOCK_N=bn)
    return y, mean, rstd


def _programs(x: torch.Tensor, m: int, bm: int) -> int:
    if x.device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4  # the interpreter: few programs, each costs milliseconds
    return max(1, min(target, triton.cdiv(m, bm)))


def backward(dy, x, w, mean, rstd, needs):
    need_dx, need_dw, need_db = needs
    m, n = x.shape
    bn = triton.next_power_of_2(n)
    bm = _rows_per_block(bn)
    progs = _programs(x, m, bm)
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), bm) * bm
    progs = triton.cdiv(m, rows_per_prog)
    dx = torch.empty_like(x) if need_dx else x  # dx_ptr is not written when NEED_DX is false
    part_w = torch.empty(progs, n, device=x.device, dtype=torch.float32)
    part_b = torch.empty(progs, n, device=x.device, dtype=torch.float32)
    _bwd_kernel[(progs,)](dy, x, w, mean, rstd, dx, part_w, part_b, m, n, rows_per_prog,
                          NEED_DX=need_dx, BLOCK_M=bm, BLOCK_N=bn)
    dw = part_w.sum(0).to(w.dtype) if need_dw else None  # stage 2 of the fp32 reduction
    db = part_b.sum(0).to(w.dtype) if need_db else None
    return (dx if need_dx else None), dw, db
