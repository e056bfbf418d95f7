"""prefix_attention in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests). Flash-attention
style: scores never leave the program, only out and the fp32 log-sum-exp are written.

- ``_fwd_kernel``: one program per (query block, b*h). It attends to the prefix (pointer of head h,
  no batch stride: every sample reads the same (P, D) rows) and then to the sequence with one online
  softmax: the running max/sum carried from the prefix into the sequence *is* the log-sum-exp merge
  of the two branches, without writing either branch out. The prefix comes first, so every row has
  a finite max even when padding or causality hide all its sequence keys.
- backward, each branch run with the merged out and lse, D = rowsum(dO * O) computed first in one kernel
  (``_delta_kernel``, fp32 in registers, no fp32 copies of dO and O): ``_dkdv_kernel`` one program per
  (key block, b*h) for the sequence; for the prefix one program per (key block, h, batch split), each
  summing its samples' contributions in registers into an fp32 partial that one launch reduces
  (``triton_reduce``): the prefix's few key blocks would otherwise leave most SMs idle (12 programs at
  H = 12, P <= 64); ``_dq_kernel`` one program per (query block, b*h) adding the prefix and the sequence
  parts of dq.

Tiles come from ``config(head_dim, dtype, gpu, capability)`` (GPU_TILES, and SM90_TILES on Hopper; checked by ``peftmed.kernels.aot``: no spills, shared memory within
the target's limit; head dims above 128 go to another implementation); offsets are 64-bit.

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
from ..triton_reduce import capability, on_gpu, reduce_partials, row_splits, sm_count


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # the CPU interpreter's bf16/fp16 tl.dot is wrong (triton 3.7): upcast there only
    # fp32 products in three TF32 passes (fp32-accurate on the tensor cores: torch's default is no TF32, and
    # the IEEE FMA path spills at any useful tile); bf16/fp16 go to the tensor cores as they are
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
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


@triton.jit(do_not_specialize=["key", "thr"])
def _fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, m_ptr, o_ptr, lse_ptr,
                H, Tq, Tk, P, D, scale, key, thr, drop_scale,
                smb, smh, smq, smk,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
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


@triton.jit(do_not_specialize=["key", "thr"])
def _dkdv_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, m_ptr,
                 B, H, Tq, Tk, P, D, scale, key, thr, drop_scale,
                 smb, smh, smq, smk, b_per_split,
                 PREFIX: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block: the sequence's (grid axis 1 = b*h), or the prefix's (axis 1 = h, axis 2 = a
    split of the batch whose samples' queries are summed here into the split's fp32 partial rows)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    if PREFIX:
        h = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2).to(tl.int64)
        n_keys = P
        kv_row = h * P + rn
        out_row = split * H * P + kv_row
        b_first = split * b_per_split
        b_last = tl.minimum(B, b_first + b_per_split)
        cols = rn
    else:
        bh = tl.program_id(1).to(tl.int64)
        h = bh % H
        n_keys = Tk
        kv_row = bh * Tk + rn
        out_row = kv_row
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
    tl.store(dk_ptr + out_row[:, None] * D + rd[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_row[:, None] * D + rd[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _delta_kernel(do_ptr, o_ptr, delta_ptr, rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[i] = sum_d dO[i, d] * O[i, d] in fp32, BLOCK_M rows per program."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mask = (rm[:, None] < rows) & (rd[None, :] < D)
    offs = rm.to(tl.int64)[:, None] * D + rd[None, :]
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rm, tl.sum(do * o, axis=1), mask=rm < rows)


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


@triton.jit(do_not_specialize=["key", "thr"])
def _dq_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, dq_ptr, m_ptr,
               H, Tq, Tk, P, D, scale, key, thr, drop_scale,
               smb, smh, smq, smk,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
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


# Tiles per (head dim, element size) and kernel on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages), the
# largest found by ``benchmarks/kernels/aot_report.py --search`` with no spill at sm_90 and sm_80 and every
# feature on (mask, causality, dropout). fwd and dq walk BLOCK_M query rows over BLOCK_N keys; dkdv holds
# BLOCK_N keys and walks BLOCK_M query rows.
GPU_TILES: dict[tuple[int, int], dict[str, tuple[int, int, int, int]]] = {
    # compiled as the JIT compiles the launches (peftmed.kernels.aot) under the pinned Triton and the GPU machine's
    # (3.6), on sm_90 and sm_80: dq (both element sizes) and the D=128 bf16 forward are the largest candidates
    # spill-free under both (aot_report.py --search-prefix under each)
    (64, 2): dict(fwd=(64, 32, 8, 2), dkdv=(64, 32, 8, 2), dq=(64, 32, 8, 2)),
    (128, 2): dict(fwd=(64, 32, 8, 2), dkdv=(32, 32, 8, 2), dq=(64, 32, 8, 2)),
    (64, 4): dict(fwd=(32, 32, 8, 2), dkdv=(16, 32, 8, 1), dq=(16, 32, 8, 1)),
    # fp32 above head dim 64: no tile without spills; the dispatcher does not give it to Triton
    # (impls.TRITON_LIMITS)
}
# On Hopper (sm_90) alone, larger tiles where they compile spill-free under both Tritons and take wgmma, where the
# common table's would run mma.sync: dk/dv at D=128 bf16 (32-row tiles cannot use wgmma; 128 x 32 spills on sm_80)
SM90_TILES: dict[tuple[int, int], dict[str, tuple[int, int, int, int]]] = {
    (128, 2): dict(dkdv=(128, 32, 8, 2)),
}
KERNELS = ("fwd", "dkdv", "dq")


def config(head_dim: int, dtype: torch.dtype, gpu: bool, capability: tuple[int, int] = (8, 0)) -> dict[str, dict]:
    """Tiles of each prefix-attention kernel ("fwd", "dkdv", "dq") for a head dim and element type, on a GPU of this
    compute capability (the interpreter pays per element: small tiles)."""
    bd = max(16, triton.next_power_of_2(head_dim))
    if not gpu:
        one = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=bd, num_warps=4, num_stages=1)
        return {k: dict(one) for k in KERNELS}
    key = (max(64, bd), 4 if dtype.itemsize == 4 else 2)
    tiles = dict(GPU_TILES[key], **(SM90_TILES.get(key, {}) if tuple(capability) >= (9, 0) else {}))
    return {k: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st)
            for k, (bm, bn, w, st) in tiles.items()}


def _common(q, pk, mask, scale, p, seed):
    """Launch arguments shared by every kernel."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    gpu = on_gpu(q)
    cfg = config(d, q.dtype, gpu, capability(q.device) if gpu else (8, 0))
    if mask is None:
        m_ptr, strides = q, (0, 0, 0, 0)  # never read (HAS_MASK is false)
    else:
        m_ptr = mask.view(torch.uint8)
        strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, m_ptr.stride()))
    flags = dict(HAS_MASK=mask is not None, DROPOUT=p > 0, UPCAST=not gpu)
    if p > 0:
        key = seed_key(seed)  # passed as an int32 bit pattern: one argument type for every seed (no recompiles)
        drop = (key - (1 << 32) if key >= 1 << 31 else key, threshold(p), 1.0 / (1.0 - p))
    else:
        drop = (0, 0, 1.0)
    return scale, m_ptr, strides, flags, drop, cfg


def forward(q, k, v, pk, pv, mask, causal, scale, p, seed):
    b, h, tq, d = q.shape
    tk, n = k.shape[2], pk.shape[1]
    scale, m_ptr, strides, flags, drop, cfg = _common(q, pk, mask, scale, p, seed)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(tq, cfg["fwd"]["BLOCK_M"]), b * h)
    _fwd_kernel[grid](q, k, v, pk, pv, m_ptr, out, lse, h, tq, tk, n, d, scale, *drop, *strides,
                      CAUSAL=causal, **flags, **cfg["fwd"])
    return out, lse


def _prefix_splits(q: torch.Tensor, b: int, h: int, key_blocks: int) -> int:
    """Batch splits of the prefix dk/dv grid: enough programs for about two per SM on a GPU."""
    if not on_gpu(q):
        return 1
    return max(1, min(b, triton.cdiv(2 * sm_count(q.device), max(1, h * key_blocks))))


def backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse):
    b, h, tq, d = q.shape
    tk, n = k.shape[2], pk.shape[1]
    scale, m_ptr, strides, flags, drop, cfg = _common(q, pk, mask, scale, p, seed)
    dout, out = dout.contiguous(), out.contiguous()
    rows = b * h * tq
    delta = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)  # rowsum(dO * O), one launch
    _delta_kernel[(triton.cdiv(rows, 64),)](dout, out, delta, rows, d, BLOCK_M=64, BLOCK_D=cfg["fwd"]["BLOCK_D"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bn = cfg["dkdv"]["BLOCK_N"]
    _dkdv_kernel[(triton.cdiv(tk, bn), b * h, 1)](q, dout, lse, delta, k, v, dk, dv, m_ptr, b, h, tq, tk, n, d,
                                                  scale, *drop, *strides, 1, PREFIX=False, CAUSAL=causal, **flags,
                                                  **cfg["dkdv"])
    splits, per_split = row_splits(b, 1, _prefix_splits(q, b, h, triton.cdiv(n, bn)))
    part = torch.empty(2, splits, h * n, d, device=q.device, dtype=torch.float32)
    _dkdv_kernel[(triton.cdiv(n, bn), h, splits)](q, dout, lse, delta, pk, pv, part[0], part[1], m_ptr, b, h, tq, tk,
                                                  n, d, scale, *drop, *strides, per_split, PREFIX=True, CAUSAL=False,
                                                  **flags, **cfg["dkdv"])
    dpk = reduce_partials(part[0], torch.empty(h * n, d, device=q.device, dtype=pk.dtype))
    dpv = reduce_partials(part[1], torch.empty(h * n, d, device=q.device, dtype=pv.dtype))
    _dq_kernel[(triton.cdiv(tq, cfg["dq"]["BLOCK_M"]), b * h)](q, dout, lse, delta, k, v, pk, pv, dq, m_ptr, h, tq, tk,
                                                               n, d, scale, *drop, *strides, CAUSAL=causal, **flags,
                                                               **cfg["dq"])
    return dq, dk, dv, dpk.view(pk.shape), dpv.view(pv.shape)
