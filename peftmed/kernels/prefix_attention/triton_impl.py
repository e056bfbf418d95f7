"""prefix_attention in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests). Flash-attention
style: scores never leave the program, only out and the fp32 log-sum-exp are written.

- ``_fwd_kernel``: one program per (query block, b*h). It attends to the prefix (pointer of head h,
  no batch stride: every sample reads the same (P, D) rows) and then to the sequence with one online
  softmax: the running max/sum carried from the prefix into the sequence *is* the log-sum-exp merge
  of the two branches, without writing either branch out. The prefix comes first, so every row has
  a finite max even when padding or causality hide all its sequence keys.
- backward, each branch run with the merged out and lse, D = rowsum(dO * O) computed first:
  ``_dkdv_kernel`` one program per (key block, b*h) for the sequence; for the prefix one program per
  (key block, h) walking every sample's queries, so dpk/dpv are summed over the batch in registers
  (no atomics, no per-sample copies); ``_dq_kernel`` one program per (query block, b*h) adding the
  prefix and the sequence parts of dq.

Dropout uses the shared hash of peftmed.kernels.dropout (row (b*H + h)*Tq + i, column over
[prefix; sequence]), regenerated in backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..dropout import seed_key, threshold
from ..triton_dropout import keep_mask as _keep


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # the CPU interpreter's bf16/fp16 tl.dot is wrong (triton 3.7): upcast there only
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _visible(rm, rn, b, h, m_ptr, smb, smh, smq, smk, Tq, Tk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) visibility of sequence keys rn to queries rm."""
    ok = (rm[:, None] < Tq) & (rn[None, :] < Tk)
    if HAS_MASK:
        m = tl.load(m_ptr + b * smb + h * smh + rm[:, None] * smq + rn[None, :] * smk, mask=ok, other=0)
        ok = ok & (m != 0)
    if CAUSAL:
        ok = ok & (rn[None, :] <= rm[:, None] + (Tk - Tq))
    return ok


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, m_ptr, o_ptr, lse_ptr,
                H, Tq, Tk, P, D, scale, key, thr, drop_scale,
                smb, smh, smq, smk,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rows = bh * Tq + rm  # dropout row = (b * H + h) * Tq + i
    q = tl.load(q_ptr + (bh * Tq + rm[:, None]) * D + rd[None, :], mask=(rm[:, None] < Tq) & (rd[None, :] < D),
                other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # the prefix: head h's rows, shared by every sample
    for n0 in range(0, P, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (rn[:, None] < P) & (rd[None, :] < D)
        kt = tl.load(pk_ptr + (h * P + rn[:, None]) * D + rd[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(pv_ptr + (h * P + rn[:, None]) * D + rd[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(kt), UPCAST) * scale
        s = tl.where(rn[None, :] < P, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(rows, rn, key, thr), p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, UPCAST)
        m_i = m_new
    # the sequence, continuing the same running max and sum (= the log-sum-exp merge)
    for n0 in range(0, Tk, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (rn[:, None] < Tk) & (rd[None, :] < D)
        kt = tl.load(k_ptr + (bh * Tk + rn[:, None]) * D + rd[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(v_ptr + (bh * Tk + rn[:, None]) * D + rd[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(kt), UPCAST) * scale
        s = tl.where(_visible(rm, rn, b, h, m_ptr, smb, smh, smq, smk, Tq, Tk, HAS_MASK, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the prefix came first
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(rows, P + rn, key, thr), p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (bh * Tq + rm[:, None]) * D + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < Tq) & (rd[None, :] < D))
    tl.store(lse_ptr + bh * Tq + rm, m_i + tl.log(l_i), mask=rm < Tq)


@triton.jit
def _dkdv_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, m_ptr,
                 B, H, Tq, Tk, P, D, scale, key, thr, drop_scale,
                 smb, smh, smq, smk,
                 PREFIX: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block: the sequence's (grid axis 1 = b*h) or the prefix's (axis 1 = h, all
    samples' queries summed here)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    if PREFIX:
        h = tl.program_id(1)
        n_keys = P
        kv_row = h * P + rn
        b_first = 0
        b_last = B
        cols = rn
    else:
        bh = tl.program_id(1)
        h = bh % H
        n_keys = Tk
        kv_row = bh * Tk + rn
        b_first = bh // H
        b_last = b_first + 1
        cols = P + rn
    kv_mask = (rn[:, None] < n_keys) & (rd[None, :] < D)
    kt = tl.load(k_ptr + kv_row[:, None] * D + rd[None, :], mask=kv_mask, other=0.0)
    vt = tl.load(v_ptr + kv_row[:, None] * D + rd[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for b in range(b_first, b_last):
        bh_q = b * H + h
        for m0 in range(0, Tq, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            q_mask = (rm[:, None] < Tq) & (rd[None, :] < D)
            q = tl.load(q_ptr + (bh_q * Tq + rm[:, None]) * D + rd[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_ptr + (bh_q * Tq + rm[:, None]) * D + rd[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + bh_q * Tq + rm, mask=rm < Tq, other=0.0)
            delta = tl.load(delta_ptr + bh_q * Tq + rm, mask=rm < Tq, other=0.0)
            s = _dot(q, tl.trans(kt), UPCAST) * scale  # (BLOCK_M, BLOCK_N)
            if PREFIX:
                ok = (rm[:, None] < Tq) & (rn[None, :] < P)
            else:
                ok = _visible(rm, rn, b, h, m_ptr, smb, smh, smq, smk, Tq, Tk, HAS_MASK, CAUSAL)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # the full softmax's probabilities
            dp = _dot(do, tl.trans(vt), UPCAST)
            if DROPOUT:
                keep = _keep(bh_q * Tq + rm, cols, key, thr)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                pd = p
            dv += _dot(tl.trans(pd).to(do.dtype), do, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST)
    tl.store(dk_ptr + kv_row[:, None] * D + rd[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_row[:, None] * D + rd[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(q, do, lse, delta, k_base, v_base, rn, n_keys, rd, D, ok, rows, cols, scale, key, thr, drop_scale,
              DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """One key block's part of dq / scale: dS K with dS = P * (dP - delta), P the merged probabilities."""
    kv_mask = (rn[:, None] < n_keys) & (rd[None, :] < D)
    kt = tl.load(k_base + rn[:, None] * D + rd[None, :], mask=kv_mask, other=0.0)
    vt = tl.load(v_base + rn[:, None] * D + rd[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(kt), UPCAST) * scale
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(vt), UPCAST)
    if DROPOUT:
        dp = tl.where(_keep(rows, cols, key, thr), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(kt.dtype), kt, UPCAST)


@triton.jit
def _dq_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, dq_ptr, m_ptr,
               H, Tq, Tk, P, D, scale, key, thr, drop_scale,
               smb, smh, smq, smk,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rows = bh * Tq + rm
    q_mask = (rm[:, None] < Tq) & (rd[None, :] < D)
    q = tl.load(q_ptr + (bh * Tq + rm[:, None]) * D + rd[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + (bh * Tq + rm[:, None]) * D + rd[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * Tq + rm, mask=rm < Tq, other=0.0)
    delta = tl.load(delta_ptr + bh * Tq + rm, mask=rm < Tq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, P, BLOCK_N):  # the prefix (shared rows of head h)
        rn = n0 + tl.arange(0, BLOCK_N)
        ok = (rm[:, None] < Tq) & (rn[None, :] < P)
        dq += _dq_block(q, do, lse, delta, pk_ptr + h * P * D, pv_ptr + h * P * D, rn, P, rd, D, ok, rows, rn,
                        scale, key, thr, drop_scale, DROPOUT, UPCAST)
    for n0 in range(0, Tk, BLOCK_N):  # the sequence
        rn = n0 + tl.arange(0, BLOCK_N)
        ok = _visible(rm, rn, b, h, m_ptr, smb, smh, smq, smk, Tq, Tk, HAS_MASK, CAUSAL)
        dq += _dq_block(q, do, lse, delta, k_ptr + bh * Tk * D, v_ptr + bh * Tk * D, rn, Tk, rd, D, ok, rows,
                        P + rn, scale, key, thr, drop_scale, DROPOUT, UPCAST)
    tl.store(dq_ptr + (bh * Tq + rm[:, None]) * D + rd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_mask)


def _common(q, pk, mask, scale, p, seed):
    """Launch arguments shared by every kernel."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    gpu = q.device.type == "cuda"
    block = 64 if gpu else 16  # the interpreter pays per element: small tiles in tests
    if mask is None:
        m_ptr, strides = q, (0, 0, 0, 0)  # never read (HAS_MASK is false)
    else:
        m_ptr = mask.view(torch.uint8)
        strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, m_ptr.stride()))
    flags = dict(HAS_MASK=mask is not None, DROPOUT=p > 0, UPCAST=not gpu, BLOCK_D=max(16, triton.next_power_of_2(d)))
    drop = (seed_key(seed), threshold(p), 1.0 / (1.0 - p)) if p > 0 else (0, 0, 1.0)
    return scale, block, m_ptr, strides, flags, drop


def forward(q, k, v, pk, pv, mask, causal, scale, p, seed):
    b, h, tq, d = q.shape
    tk, n = k.shape[2], pk.shape[1]
    scale, block, m_ptr, strides, flags, drop = _common(q, pk, mask, scale, p, seed)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(tq, block), b * h)
    _fwd_kernel[grid](q, k, v, pk, pv, m_ptr, out, lse, h, tq, tk, n, d, scale, *drop, *strides,
                      CAUSAL=causal, BLOCK_M=block, BLOCK_N=block, **flags)
    return out, lse


def backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse):
    b, h, tq, d = q.shape
    tk, n = k.shape[2], pk.shape[1]
    scale, block, m_ptr, strides, flags, drop = _common(q, pk, mask, scale, p, seed)
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk, dpv = torch.empty_like(pk), torch.empty_like(pv)
    common = dict(BLOCK_M=block, BLOCK_N=block, **flags)
    _dkdv_kernel[(triton.cdiv(tk, block), b * h)](q, dout, lse, delta, k, v, dk, dv, m_ptr, b, h, tq, tk, n, d,
                                                  scale, *drop, *strides, PREFIX=False, CAUSAL=causal, **common)
    _dkdv_kernel[(triton.cdiv(n, block), h)](q, dout, lse, delta, pk, pv, dpk, dpv, m_ptr, b, h, tq, tk, n, d,
                                             scale, *drop, *strides, PREFIX=True, CAUSAL=False, **common)
    _dq_kernel[(triton.cdiv(tq, block), b * h)](q, dout, lse, delta, k, v, pk, pv, dq, m_ptr, h, tq, tk, n, d,
                                                scale, *drop, *strides, CAUSAL=causal, **common)
    return dq, dk, dv, dpk, dpv
