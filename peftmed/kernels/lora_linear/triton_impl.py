"""lora_linear in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests).

Three kernels, each written once over strides and reused by forward and backward:

- ``_down_kernel``:  out (M, R) = alpha * (X * mask) Wd^T        xa = dropout(x) A^T;  gs = s * dy B
- ``_gemm_lora_kernel``: C (M, N) = X W (+ bias) + alpha * ((L Rm) * mask)
  the base GEMM with the LoRA product added in its epilogue, so the LoRA term never makes a (M, N)
  tensor:  y = x W^T + b + s xa B^T,   dx = dy W + dropout'(gs A)
- ``_wgrad_kernel``: out (R, N) = G^T (X * mask), split over M into fp32 partials summed afterwards
  dA = gs^T dropout(x),  dB^T = xa^T dy

The dropout mask is the shared hash of peftmed.kernels.dropout, regenerated in every kernel that
needs it (never stored). dW = dy^T x and dbias (base layer trainable, rare for LoRA) use torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import seed_key, threshold
from ..triton_dropout import keep_mask as _keep


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # the CPU interpreter's bf16/fp16 tl.dot returns garbage (triton 3.7): upcast there only
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _down_kernel(x_ptr, w_ptr, out_ptr, M, K, R, sxm, sxk, swr, swk, alpha, key, thr, drop_scale,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(rm, rk, key, thr), x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
        w = tl.load(w_ptr + rk[:, None] * swk + rr[None, :] * swr, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc = _dot(x, w, acc, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_R)
    tl.store(out_ptr + rm[:, None] * R + rr[None, :], (acc * alpha).to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _gemm_lora_kernel(x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, c_ptr, M, N, K, R,
                      sxm, sxk, swk, swn, slm, slr, srr, srn, alpha, key, thr, drop_scale,
                      HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = _dot(x, w, acc, PRECISION, UPCAST)
    # epilogue: the rank-R LoRA product for this tile
    rr = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rm[:, None] * slm + rr[None, :] * slr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    up = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    lora = _dot(lo, up, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
    if DROPOUT:
        lora = tl.where(_keep(rm, rn, key, thr), lora * drop_scale, 0.0)
    acc += alpha * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _wgrad_kernel(g_ptr, x_ptr, part_ptr, M, N, R, rows_per_split, sgm, sgr, sxm, sxn, key, thr, drop_scale,
                  DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    m_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(g_ptr + rm[None, :] * sgm + rr[:, None] * sgr, mask=(rm[None, :] < m_end) & (rr[:, None] < R), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * sxm + rn[None, :] * sxn, mask=(rm[:, None] < m_end) & (rn[None, :] < N), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(rm, rn, key, thr), x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
        acc = _dot(g, x, acc, PRECISION, UPCAST)  # (BLOCK_R, BLOCK_N)
    tl.store(part_ptr + split * R * N + rr[:, None] * N + rn[None, :], acc, mask=(rr[:, None] < R) & (rn[None, :] < N))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _dot_args(t: torch.Tensor) -> dict:
    # fp32 uses IEEE products like torch's default (no TF32); the interpreter (CPU) needs UPCAST
    return {"PRECISION": "ieee" if t.dtype == torch.float32 else "tf32", "UPCAST": t.device.type == "cpu"}


def _drop_args(p: float, seed: int):
    return (seed_key(seed), threshold(p), 1.0 / (1.0 - p)) if p > 0 else (0, 0, 1.0)


def _blocks(t: torch.Tensor):
    # small tiles in the interpreter (each program costs milliseconds there), GEMM-sized on a GPU
    return (32, 32, 32) if t.device.type == "cpu" else (128, 128, 32)


def _down(x, wd_strides, wd, r, alpha, p, seed, out_dtype):
    m, k = x.shape
    out = torch.empty(m, r, device=x.device, dtype=out_dtype)
    bm = 32 if x.device.type == "cpu" else 64
    _down_kernel[(triton.cdiv(m, bm),)](
        x, wd, out, m, k, r, x.stride(0), x.stride(1), *wd_strides, alpha, *_drop_args(p, seed),
        DROPOUT=p > 0, BLOCK_M=bm, BLOCK_K=64, BLOCK_R=_block_r(r), **_dot_args(x))
    return out


def _gemm_lora(x, w, w_strides, n, bias, lo, up, up_strides, alpha, p, seed):
    m, k = x.shape
    r = lo.shape[1]
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bm, bn, bk = _blocks(x)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemm_lora_kernel[grid](
        x, w, bias if bias is not None else c, lo, up, c, m, n, k, r,
        x.stride(0), x.stride(1), *w_strides, lo.stride(0), lo.stride(1), *up_strides, alpha, *_drop_args(p, seed),
        HAS_BIAS=bias is not None, DROPOUT=p > 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_block_r(r),
        **_dot_args(x))
    return c


def _wgrad(g, x, p, seed):
    m, n = x.shape
    r = g.shape[1]
    bm, bn = (32, 32) if x.device.type == "cpu" else (64, 128)
    splits = max(1, min(triton.cdiv(m, bm), 1 if x.device.type == "cpu" else 64))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty(splits, r, n, device=x.device, dtype=torch.float32)
    _wgrad_kernel[(triton.cdiv(n, bn), splits)](
        g, x, part, m, n, r, rows_per_split, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        *_drop_args(p, seed), DROPOUT=p > 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_block_r(r), **_dot_args(x))
    return part.sum(0)  # stage 2 of the fp32 reduction over rows


def forward(x, w, bias, a, b, scaling, p, seed):
    r = a.shape[0]
    xa = _down(x, (a.stride(0), a.stride(1)), a, r, 1.0, p, seed, x.dtype)  # (T, r)
    # y = x W^T: W^T[k, n] = w[n, k];  the up-projection B^T[r, n] = b[n, r]
    y = _gemm_lora(x, w, (w.stride(1), w.stride(0)), w.shape[0], bias, xa, b, (b.stride(1), b.stride(0)),
                   scaling, 0.0, seed)
    return y, xa


def backward(dy, x, w, a, b, xa, scaling, p, seed, needs):
    need_dx, need_dw, need_dbias, need_da, need_db = needs
    r = a.shape[0]
    dx = dw = dbias = da = db = None
    if need_dx or need_da:
        # gs = s * dy B: the "down" kernel with Wd[r, k] = b[k, r]
        gs = _down(dy, (b.stride(1), b.stride(0)), b, r, scaling, 0.0, seed, torch.float32)
        if need_dx:
            dx = _gemm_lora(dy, w, (w.stride(0), w.stride(1)), w.shape[1], None, gs.to(dy.dtype), a,
                            (a.stride(0), a.stride(1)), 1.0, p, seed)
        if need_da:
            da = _wgrad(gs.to(x.dtype), x, p, seed).to(a.dtype)
    if need_db:
        db = (_wgrad(xa, dy, 0.0, seed).t() * scaling).to(b.dtype)
    if need_dw:
        dw = dy.t() @ x
    if need_dbias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db
