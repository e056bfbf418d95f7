"""lora_linear as one persistent, TMA-fed GEMM per product: the design that can reach the base GEMM's time.

Today's Triton path (``triton_impl``) reads x twice in the forward (``_down_kernel`` for xa = x A^T, then the base
GEMM) and dy three times in the backward; its floor is about 1.12-1.17x the base GEMM pair even with GEMMs as fast
as cuBLAS's (``benchmarks/kernels/estimates.py``). Here each product is one launch of ``_persistent_kernel``:

    C (M, N) = X (M, K) W' (K, N) + bias + alpha * L U          L (M, R) = beta * dropout(X) D (K, R)

- a fixed grid of one program per SM walks the output tiles (grouped: GROUP_M row blocks share each W column
  block while it is in L2); X and W tiles arrive through TMA descriptors (``tl.make_tensor_descriptor``);
- the first tile of each row block (its *producer*, column block 0) also multiplies the X tiles it loads anyway by
  D: an extra R-column tile of the same pass over X, so L costs no second read of X. It stores L (the forward's xa,
  saved for backward; the backward's gs) and raises the row block's flag;
- every other tile of the row block runs its own K loop first and waits for the flag only in its epilogue, where it
  adds alpha * L U to its accumulator (one more rank-R product into the same registers: no second tile);
- in the backward (X = dy, D = B, U = A) the producer also adds dy_chunk^T xa into an fp32 (N, R) buffer with
  atomics (``ACC_DB``): dB needs no pass of its own. That buffer (r x n x 4 bytes: 256 KB at 4096 x 16) stays in L2.

Forward: 1 launch (was 2; plus the flags' memset). Backward: dx with gs and dB (1 launch), dA = gs^T x (today's
``_wgrad_kernel``, its row splits adding into fp32 sums in L2 with atomics: no partials, no reduce launch), dA's and
dB's casts (2 small launches), one memset for the flags and both sums; today's is 5 launches with dy read twice and
the partials of dA and dB written and read back.

Deadlock freedom: every program walks its tiles in increasing order and a producer's index is below every tile
that waits for it, so the lowest unfinished tile never waits — provided all programs are resident at once, which a
grid of at most one program per SM (one block per SM fits: ``persistent_config``) gives. The CPU interpreter runs
programs one after another, so there the grid is one program (the same code, every wait already satisfied).

Where it does not fit, the calls go to ``triton_impl`` (the fallback, which this module's ``forward``/``backward``
call): fp32 (three TF32 passes: other tiles), dropout in the backward's dx (its LoRA term is masked per element: a
second tile), TMA's 16-byte alignment (rows of K and N elements), grids smaller than the GPU, and
``torch.use_deterministic_algorithms`` (dB's atomics sum in no fixed order).

Not yet measured on a GPU (no device has run it): the dispatcher gives it only when asked for by name
(``kernel="triton_persistent"``); ``benchmarks/kernels/bench_lora_breakdown.py`` times it against cuBLAS and today's
kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_dropout import keep_mask as _keep
from ..triton_reduce import capability, on_gpu, sm_count
from . import triton_impl as fallback
from .triton_impl import _block_r, _dot, _dot_args, _drop_args


MAX_RANK = 64  # at rank blocks of 128 the backward spills registers on sm_90 (the AOT gate)


@triton.jit
def _tiles(x_desc, w_desc, off_m, off_n, k0, W_KN: tl.constexpr):
    """The X tile (BLOCK_M, BLOCK_K) and W' tile (BLOCK_K, BLOCK_N) at k0, through their TMA descriptors."""
    x = x_desc.load([off_m, k0])
    if W_KN:
        w = w_desc.load([k0, off_n])
    else:
        w = w_desc.load([off_n, k0]).T
    return x, w


@triton.jit(do_not_specialize=["key", "thr"])
def _persistent_kernel(x_ptr, w_ptr, bias_ptr, d_ptr, u_ptr, lo_ptr, flag_ptr, xa_ptr, db_ptr, c_ptr, M, N, K, R,
                       sdk, sdr, sur, sun, alpha, beta, key, thr, drop_scale,
                       W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC_DB: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """W' is w read as (K, N) when W_KN (the backward's dx = dy W), else w (N, K) read transposed (y = x W^T)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_KN:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    rr = tl.arange(0, BLOCK_R)
    for tile in range(tl.program_id(0), blocks_m * blocks_n, tl.num_programs(0)):
        first_m = (tile // in_group) * GROUP_M
        group_m = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_m
        pid_n = (tile % in_group) // group_m  # 0 for the group's first group_m tiles: the producers come first
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        row_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if pid_n == 0:  # the producer: the base tile and, from the same X tiles, L = beta * dropout(X) D
            down = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if ACC_DB:
                xa = tl.load(xa_ptr + rm64[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R),
                             other=0.0)
            for k0 in range(0, K, BLOCK_K):
                x, w = _tiles(x_desc, w_desc, off_m, off_n, k0, W_KN)
                acc = _dot(x, w, acc, PRECISION, UPCAST)
                rk = k0 + tl.arange(0, BLOCK_K)
                d = tl.load(d_ptr + rk[:, None] * sdk + rr[None, :] * sdr, mask=(rk[:, None] < K) & (rr[None, :] < R),
                            other=0.0)
                if DROPOUT:
                    xd = tl.where(_keep(rm, rk, key, thr), x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
                    down = _dot(xd, d, down, PRECISION, UPCAST)
                else:
                    down = _dot(x, d, down, PRECISION, UPCAST)
                if ACC_DB:  # dB rows k0.. += X_chunk^T xa (fp32, in L2; rows past M are TMA's zeros)
                    part = _dot(tl.trans(x), xa, tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32), PRECISION, UPCAST)
                    tl.atomic_add(db_ptr + rk[:, None].to(tl.int64) * R + rr[None, :], part,
                                  mask=(rk[:, None] < K) & (rr[None, :] < R), sem="relaxed")
            lo = (down * beta).to(lo_ptr.dtype.element_ty)
            tl.store(lo_ptr + rm64[:, None] * R + rr[None, :], lo, mask=row_ok[:, None] & (rr[None, :] < R))
            tl.debug_barrier()  # every thread's part of L is written before the flag says so
            tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release")
        else:
            for k0 in range(0, K, BLOCK_K):
                x, w = _tiles(x_desc, w_desc, off_m, off_n, k0, W_KN)
                acc = _dot(x, w, acc, PRECISION, UPCAST)
            while tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire") == 0:  # the producer's L, once it is written
                pass
            tl.debug_barrier()
            lo = tl.load(lo_ptr + rm64[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R),
                         other=0.0, cache_modifier=".cg")
        rn = off_n + tl.arange(0, BLOCK_N)
        up = tl.load(u_ptr + rr[:, None] * sur + rn[None, :] * sun, mask=(rr[:, None] < R) & (rn[None, :] < N),
                     other=0.0)
        # alpha folded into U (rounded once to the operand type), so the rank-R product adds into acc itself
        acc = _dot(lo, (up.to(tl.float32) * alpha).to(up.dtype), acc, PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def persistent_config(dtype: torch.dtype, gpu: bool, block_r: int = 16) -> dict:
    """128 x 256 tiles on sm_90 at rank blocks of 16 (LoRAFusion's pick for this shape; the accumulator is 128
    registers a thread at 8 warps), 3 stages of TMA buffers (with the output tile's staging, 214-222 KB of shared
    memory: one block per SM, as the persistent schedule needs); 128 x 128 tiles and 4 stages at rank blocks of 32
    and 64 (the rank tiles' buffers take the room of the 256-wide tile's); small tiles in the interpreter.
    ``tests/kernels/test_aot.py`` gates them under both Tritons."""
    if not gpu:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if block_r <= 16:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def fits(x: torch.Tensor, m: int, n: int, k: int, r: int) -> str | None:
    """Why ``_persistent_kernel`` does not take a product of X (m, k) and W' (k, n) at rank r (None if it does)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"{x.dtype} (bf16/fp16 only: fp32's three TF32 passes need other tiles)"
    e = x.element_size()
    if (k * e) % 16 or (n * e) % 16:
        return f"rows of {k} and {n} elements are not 16-byte multiples (TMA)"
    if r > MAX_RANK:
        return f"rank {r} is above {MAX_RANK} (at rank blocks of 128 the backward spills registers on sm_90)"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are asked for (dB's atomic sums have no fixed order)"
    gpu = on_gpu(x)
    if gpu and capability(x.device) < (9, 0):
        return f"compute capability {capability(x.device)} (TMA and wgmma need Hopper, 9.0; on sm_80 these tiles spill)"
    if gpu:
        cfg = persistent_config(x.dtype, gpu, _block_r(r))
        if triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]) < sm_count(x.device):
            return "fewer output tiles than the GPU has SMs (today's kernels take 64 x 64 tiles there)"
    return None


_ALLOCATOR_SET = False


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _product(x, w, w_kn, n, bias, d, d_strides, u, u_strides, lo, alpha, beta, p, seed, xa=None, db=None,
             flags=None):
    """One launch: returns C; writes L into ``lo`` (and adds X^T xa into ``db`` when given). ``flags``: one zeroed
    int32 per row block (allocated here when not given)."""
    global _ALLOCATOR_SET
    m, k = x.shape
    r = lo.shape[1]
    gpu = on_gpu(x)
    if gpu and x.device.type == "cuda" and not _ALLOCATOR_SET:  # device-side TMA descriptors take global scratch
        triton.set_allocator(_tma_scratch)
        _ALLOCATOR_SET = True
    cfg = persistent_config(x.dtype, gpu, _block_r(r))
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    blocks_m = triton.cdiv(m, cfg["BLOCK_M"])
    if flags is None:
        flags = torch.zeros(blocks_m, device=x.device, dtype=torch.int32)
    tiles = blocks_m * triton.cdiv(n, cfg["BLOCK_N"])
    grid = (min(tiles, sm_count(x.device)) if gpu else 1,)  # one program per SM: all resident (module docstring)
    _persistent_kernel[grid](
        x, w, bias if bias is not None else c, d, u, lo, flags, xa if xa is not None else lo,
        db if db is not None else flags, c, m, n, k, r, *d_strides, *u_strides, float(alpha), float(beta),
        *_drop_args(p, seed), W_KN=w_kn, HAS_BIAS=bias is not None, DROPOUT=p > 0, ACC_DB=db is not None,
        BLOCK_R=_block_r(r), **_dot_args(x.dtype, gpu), **cfg)
    return c


def forward(x, w, bias, a, b, scaling, p, seed):
    n, k = w.shape
    r = a.shape[0]
    if fits(x, x.shape[0], n, k, r):
        return fallback.forward(x, w, bias, a, b, scaling, p, seed)
    xa = torch.empty(x.shape[0], r, device=x.device, dtype=x.dtype)
    # D = A^T (d[k, r] = a[r, k]), U = B^T (u[r, n] = b[n, r]); L = xa unscaled (saved for backward)
    y = _product(x, w, False, n, bias, a, (a.stride(1), a.stride(0)), b, (b.stride(1), b.stride(0)), xa, scaling,
                 1.0, p, seed)
    return y, xa


def backward(dy, x, w, a, b, xa, scaling, p, seed, needs):
    need_dx, need_dw, need_dbias, need_da, need_db = needs
    n, k = w.shape
    r = a.shape[0]
    if not (need_dx and need_da) or p > 0 or fits(dy, dy.shape[0], k, n, r):
        return fallback.backward(dy, x, w, a, b, xa, scaling, p, seed, needs)
    gs = torch.empty(dy.shape[0], r, device=dy.device, dtype=dy.dtype)
    # the row blocks' flags and the fp32 sums of dA and dB zeroed by one memset (zero bits are 0.0)
    gpu = on_gpu(dy)
    blocks_m = triton.cdiv(dy.shape[0], persistent_config(dy.dtype, gpu, _block_r(r))["BLOCK_M"])
    scratch = torch.zeros(blocks_m + r * k + (n * r if need_db else 0), device=dy.device, dtype=torch.int32)
    flags = scratch[:blocks_m]
    da_sum = scratch[blocks_m:blocks_m + r * k].view(torch.float32).view(r, k)
    db_sum = scratch[blocks_m + r * k:].view(torch.float32).view(n, r) if need_db else None
    # X = dy, W' = w as (N, K), D = B (d[n, r] = b[n, r]), U = A; L = gs = s dy B; dB += dy^T xa
    dx = _product(dy, w, True, k, None, b, (b.stride(0), b.stride(1)), a, (a.stride(0), a.stride(1)), gs, 1.0,
                  scaling, 0.0, seed, xa=xa.contiguous() if need_db else None, db=db_sum, flags=flags)
    # dA = gs^T x: today's split over rows, each split adding into dA's fp32 sums (no partials, no reduce launch)
    fallback._wgrad(gs, x, 0.0, seed, None, sums=da_sum, most=sm_count(x.device) if gpu else 2)
    da = torch.mul(da_sum, 1.0, out=torch.empty_like(a))  # cast: one launch
    db = torch.mul(db_sum, scaling, out=torch.empty_like(b)) if need_db else None  # scaled and cast: one launch
    dw = dy.t() @ x if need_dw else None
    dbias = dy.sum(0) if need_dbias else None
    return dx, dw, dbias, da, db
