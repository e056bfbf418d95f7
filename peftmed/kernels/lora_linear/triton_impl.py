"""lora_linear in Triton (GPU; on CPU through TRITON_INTERPRET=1 for tests).

Four kernels, each written once over strides (the first three reused by forward and backward):

- ``_down_kernel``:  out (M, R) = alpha * (X * mask) Wd^T        xa = dropout(x) A^T;  gs = s * dy B
- ``_gemm_lora_kernel``: C (M, N) = X W (+ bias) + alpha * ((L Rm) * mask)
  the base GEMM whose accumulator *starts* as the rank-R LoRA product of its tile, so the LoRA term
  never makes a (M, N) tensor and holds no second (BLOCK_M, BLOCK_N) tile in registers (a product in the
  epilogue did: 255 registers and spills on sm_90); programs are ordered in groups of GROUP_M row blocks
  so a wave of programs re-reads the same W columns from L2:  y = x W^T + b + s xa B^T,
  dx = dy W + dropout'(gs A)
- ``_wgrad_kernel``: out (R, N) = alpha * G^T (X * mask), split over M into fp32 partials that one launch
  (``triton_reduce``) sums, casts and stores (transposed where asked):  dA = gs^T dropout(x)
- ``_gs_db_kernel``: one pass over dy for gs = s * dy B and dB's fp32 partials (dy^T xa), each program
  adding its row blocks into its own partial slice; one reduce launch gives dB = s * sum

Backward is 5 launches (gs with dB's partials, dB's reduction, dx, dA and its reduction; was 11 with the
torch casts, sums and transposes), dy read twice (gs/dB and dx). Launch
configurations come from ``*_config`` functions, which ``peftmed.kernels.aot`` compiles for sm_90/sm_80
to check registers, spills and shared memory. Offsets into the (M, N) tensors are 64-bit (M * N can pass
2^31: a 128k-vocabulary head at 16k tokens). The dropout mask is the shared hash of
peftmed.kernels.dropout, regenerated in every kernel that needs it (never stored); its key is passed as
a 32-bit pattern and not specialised on, so a new seed never compiles a kernel again. dW = dy^T x and
dbias (base layer trainable, rare for LoRA) use torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout import seed_key, threshold
from ..triton_dropout import keep_mask as _keep
from ..triton_reduce import on_gpu, reduce_partials, row_splits, sm_count


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # the CPU interpreter's bf16/fp16 tl.dot returns garbage (triton 3.7): upcast there only
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=["key", "thr"])
def _down_kernel(x_ptr, w_ptr, out_ptr, M, K, R, sxm, sxk, swr, swk, alpha, key, thr, drop_scale,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        if DROPOUT:
            x = tl.where(_keep(rm, rk, key, thr), x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
        w = tl.load(w_ptr + rk[:, None] * swk + rr[None, :] * swr, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc = _dot(x, w, acc, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_R)
    tl.store(out_ptr + rm64[:, None] * R + rr[None, :], (acc * alpha).to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit(do_not_specialize=["key", "thr"])
def _gemm_lora_kernel(x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, c_ptr, M, N, K, R,
                      sxm, sxk, swk, swn, slm, slr, srr, srn, alpha, key, thr, drop_scale,
                      HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    # grouped ordering: GROUP_M row blocks share each column block's W tiles while they are in L2
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    # the accumulator starts as this tile's rank-R LoRA term (masked and scaled), then takes the base GEMM
    rr = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rm64[:, None] * slm + rr[None, :] * slr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    up = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    acc = _dot(lo, up, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
    if DROPOUT:
        acc = tl.where(_keep(rm, rn, key, thr), acc * drop_scale, 0.0)
    acc = acc * alpha
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        # 64-bit offsets: a weight of more than 2**31 elements (a 152k-vocabulary head at width 16k) overflows int32
        w = tl.load(w_ptr + rk.to(tl.int64)[:, None] * swk + rn.to(tl.int64)[None, :] * swn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = _dot(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm64[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["key", "thr"])
def _wgrad_kernel(g_ptr, x_ptr, part_ptr, M, N, R, rows_per_split, sgm, sgr, sxm, sxn, key, thr, drop_scale,
                  DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr = False):
    """part[split] (R, N) = G^T dropout(X) over the split's rows; with ATOMIC every split adds into part[0] (fp32
    sums that stay in L2: no partials in memory, no reduce launch; the order of the sums is not fixed)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    m_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        g = tl.load(g_ptr + rm64[None, :] * sgm + rr[:, None] * sgr, mask=(rm[None, :] < m_end) & (rr[:, None] < R),
                    other=0.0)
        x = tl.load(x_ptr + rm64[:, None] * sxm + rn[None, :] * sxn, mask=(rm[:, None] < m_end) & (rn[None, :] < N),
                    other=0.0)
        if DROPOUT:
            x = tl.where(_keep(rm, rn, key, thr), x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
        acc = _dot(g, x, acc, PRECISION, UPCAST)  # (BLOCK_R, BLOCK_N)
    ok = (rr[:, None] < R) & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(part_ptr + rr[:, None].to(tl.int64) * N + rn[None, :], acc, mask=ok, sem="relaxed")
    else:
        tl.store(part_ptr + (split * R + rr[:, None]).to(tl.int64) * N + rn[None, :], acc, mask=ok)


@triton.jit
def _gs_db_kernel(dy_ptr, b_ptr, xa_ptr, gs_ptr, part_ptr, M, N, R, rows_per_split, sdm, sdn, sbn, sbr, alpha,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    """One pass over dy for both: gs (M, R) = alpha * dy B and this split's dB partial (N, R) = sum dy^T xa.

    A program owns rows_per_split rows (whole BLOCK_M blocks) and one fp32 partial slice part[split] (N, R):
    per row block it walks dy's columns once, adding each (BLOCK_M, BLOCK_N) tile into gs (through B) and
    into the partial (through xa); the first row block stores the partial, the next ones add to it (the
    slice is the program's own: no atomics). The partials are summed by one reduce launch."""
    split = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    m_end = tl.minimum(M, (split + 1) * rows_per_split)
    first = split * rows_per_split
    for m0 in range(first, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        row_ok = rm < m_end
        xa = tl.load(xa_ptr + rm64[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        gs = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + rm64[:, None] * sdm + rn[None, :] * sdn, mask=row_ok[:, None] & (rn[None, :] < N),
                         other=0.0)
            b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R),
                        other=0.0)
            gs = _dot(dy, b, gs, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_R)
            db = _dot(tl.trans(dy), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), PRECISION, UPCAST)
            slot = part_ptr + (split * N + rn[:, None]).to(tl.int64) * R + rr[None, :]
            ok = (rn[:, None] < N) & (rr[None, :] < R)
            if m0 > first:
                db += tl.load(slot, mask=ok, other=0.0)
            tl.store(slot, db, mask=ok)
        tl.store(gs_ptr + rm64[:, None] * R + rr[None, :], (gs * alpha).to(gs_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (rr[None, :] < R))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _dot_args(dtype: torch.dtype, gpu: bool) -> dict:
    # fp32 products in three TF32 passes on a GPU: fp32-accurate like torch's default (no TF32) on the tensor
    # cores, where the IEEE FMA path spills at any tile worth having; the interpreter (CPU) needs UPCAST + IEEE
    if dtype != torch.float32:
        return {"PRECISION": "tf32", "UPCAST": not gpu}
    return {"PRECISION": "tf32x3" if gpu else "ieee", "UPCAST": not gpu}


def _drop_args(p: float, seed: int):
    if p <= 0:
        return 0, 0, 1.0
    key = seed_key(seed)
    # the 32-bit key as an int32 bit pattern: always the same argument type (a key >= 2^31 would otherwise
    # turn the argument into an int64 and compile the kernel a second time); the kernel reads it as uint32
    return (key - (1 << 32) if key >= 1 << 31 else key), threshold(p), 1.0 / (1.0 - p)


# ---- launch configurations (what peftmed.kernels.aot compiles and checks) ------------------------------
# Tiles on a GPU per element type and BLOCK_R (the rank rounded up to a power of two >= 16): the largest with no
# register spill at sm_90 and sm_80 (benchmarks/kernels/aot_report.py; tests/kernels/test_aot.py gates them).
# fp32 ranks above 32 are not the Triton kernels' (impls.TRITON_LIMITS): the tiles tried spill on sm_80.
def gemm_config(dtype: torch.dtype, gpu: bool, block_r: int = 16, m: int | None = None, n: int | None = None,
                sms: int | None = None) -> dict:
    """Tiles of the (base GEMM + LoRA) kernel: a Hopper/Ampere-sized tile on a GPU, 8 warps (the LoRA term
    seeds the accumulator), small tiles in the interpreter (each program costs milliseconds). Keyed by shape
    too: when the (m, n) output gives fewer large tiles than the GPU has SMs (a BLIP layer: 560 tokens x 768
    is 30 tiles of 128 x 128 for 132 SMs), 64 x 64 tiles (4 warps), four times as many programs."""
    if not gpu:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # three TF32 passes per product: half the columns, half the K step
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        bn = 128 if block_r <= 64 else 64  # the (BLOCK_R, BLOCK_N) up-projection tile joins the registers
        cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if m is not None and n is not None and sms and \
            triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]) < sms:
        cfg = dict(cfg, BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return cfg


def down_config(dtype: torch.dtype, gpu: bool, block_r: int = 16) -> dict:
    if not gpu:
        return dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_K=64, num_warps=4 if block_r <= 64 else 8, num_stages=3)


def wgrad_config(dtype: torch.dtype, gpu: bool, block_r: int = 16) -> dict:
    """The (BLOCK_R, BLOCK_N) fp32 sum lives in registers: fewer columns (or more warps) as the rank grows."""
    if not gpu:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # three TF32 passes hold more registers
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3) if block_r <= 16 else \
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3)
    if block_r <= 32:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if block_r <= 64 else 8, num_stages=3)


def _down(x, wd_strides, wd, r, alpha, p, seed, out_dtype):
    m, k = x.shape
    out = torch.empty(m, r, device=x.device, dtype=out_dtype)
    gpu = on_gpu(x)
    cfg = down_config(x.dtype, gpu, _block_r(r))
    _down_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, wd, out, m, k, r, x.stride(0), x.stride(1), *wd_strides, alpha, *_drop_args(p, seed),
        DROPOUT=p > 0, BLOCK_R=_block_r(r), **_dot_args(x.dtype, gpu), **cfg)
    return out


def _gemm_lora(x, w, w_strides, n, bias, lo, up, up_strides, alpha, p, seed):
    m, k = x.shape
    r = lo.shape[1]
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    gpu = on_gpu(x)
    cfg = gemm_config(x.dtype, gpu, _block_r(r), m, n, sm_count(x.device) if gpu else None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_lora_kernel[grid](
        x, w, bias if bias is not None else c, lo, up, c, m, n, k, r,
        x.stride(0), x.stride(1), *w_strides, lo.stride(0), lo.stride(1), *up_strides, alpha, *_drop_args(p, seed),
        HAS_BIAS=bias is not None, DROPOUT=p > 0, BLOCK_R=_block_r(r), **_dot_args(x.dtype, gpu), **cfg)
    return c


def _wgrad(g, x, p, seed, out: torch.Tensor | None, scale: float = 1.0, transpose: bool = False,
           sums: torch.Tensor | None = None, most: int | None = None) -> torch.Tensor:
    """``out`` = scale * g^T dropout(x) ((R, N); its transpose (N, R) with ``transpose``), in out's dtype; with
    ``sums`` (zeroed fp32 (R, N)) every row split adds into it instead (atomics: no partials, no reduce launch) and
    it is returned. ``most``: the most row splits (default 64 on a GPU, 1 on the CPU)."""
    m, n = x.shape
    r = g.shape[1]
    gpu = on_gpu(x)
    cfg = wgrad_config(x.dtype, gpu, _block_r(r))
    splits, rows_per_split = row_splits(m, cfg["BLOCK_M"], most or (64 if gpu else 1))
    part = sums if sums is not None else torch.empty(splits, r, n, device=x.device, dtype=torch.float32)
    _wgrad_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        g, x, part, m, n, r, rows_per_split, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        *_drop_args(p, seed), DROPOUT=p > 0, BLOCK_R=_block_r(r), ATOMIC=sums is not None,
        **_dot_args(x.dtype, gpu), **cfg)
    if sums is not None:
        return sums
    return reduce_partials(part, out, scale, transpose)  # stage 2 of the fp32 reduction, in one launch


def gs_db_config(dtype: torch.dtype, gpu: bool, block_r: int = 16) -> dict:
    if not gpu:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64 if block_r <= 16 else 32, BLOCK_N=32, num_warps=4 if block_r <= 16 else 8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64 if block_r <= 64 else 32, num_warps=4 if block_r <= 32 else 8, num_stages=3)


def _gs_db(dy, b, xa, scaling, db_out):
    """gs = s * dy B (in dy's dtype) and db_out = s * dy^T xa, reading dy once (plus one reduce launch)."""
    m, n = dy.shape
    r = b.shape[1]
    gpu = on_gpu(dy)
    cfg = gs_db_config(dy.dtype, gpu, _block_r(r))
    # one program per SM (132 on an H100, not a fixed 64), as far as the fp32 partials (splits x n x r) stay
    # within 64 MiB, so that they stay in L2
    most = min(sm_count(dy.device), max(1, (64 << 20) // max(1, n * r * 4))) if gpu else 2
    splits, rows_per_split = row_splits(m, cfg["BLOCK_M"], most)
    gs = torch.empty(m, r, device=dy.device, dtype=dy.dtype)
    part = torch.empty(splits, n, r, device=dy.device, dtype=torch.float32)
    _gs_db_kernel[(splits,)](dy, b, xa.contiguous(), gs, part, m, n, r, rows_per_split, dy.stride(0), dy.stride(1),
                             b.stride(0), b.stride(1), scaling, BLOCK_R=_block_r(r), **_dot_args(dy.dtype, gpu), **cfg)
    reduce_partials(part, db_out, scaling)
    return gs, db_out


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
    if (need_dx or need_da) and need_db:  # gs and dB from one pass over dy
        gs, db = _gs_db(dy, b, xa, scaling, torch.empty_like(b))
    elif need_dx or need_da:
        # gs = s * dy B: the "down" kernel with Wd[r, k] = b[k, r], written in dy's dtype (what dx and dA read)
        gs = _down(dy, (b.stride(1), b.stride(0)), b, r, scaling, 0.0, seed, dy.dtype)
    elif need_db:
        db = _wgrad(xa, dy, 0.0, seed, torch.empty_like(b), scale=scaling, transpose=True)
    if need_dx or need_da:
        if need_dx:
            dx = _gemm_lora(dy, w, (w.stride(0), w.stride(1)), w.shape[1], None, gs, a,
                            (a.stride(0), a.stride(1)), 1.0, p, seed)
        if need_da:
            da = _wgrad(gs, x, p, seed, torch.empty_like(a))
    if need_dw:
        dw = dy.t() @ x
    if need_dbias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db
