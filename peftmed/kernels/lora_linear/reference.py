"""lora_linear in plain PyTorch: the test oracle, and the ``torch`` implementation (the fallback).

    y = x W^T + b + s * (dropout(x) A^T) B^T      x: (T, in)  W: (out, in)  A: (r, in)  B: (out, r)

Every implementation provides these two functions with these signatures (x, dy 2-D contiguous):

    forward(x, w, bias, a, b, scaling, p, seed) -> (y, xa)
        xa = dropout(x) A^T, shape (T, r), saved for backward (it is tiny)
    backward(dy, x, w, a, b, xa, scaling, p, seed, needs) -> (dx, dw, dbias, da, db)
        needs: 5 bools (the same order); an entry not needed may be returned as None

p is the dropout probability in effect (0 when not training); the mask is keep_mask(seed, ...) from
peftmed.kernels.dropout, regenerated in backward rather than stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dropout import keep_mask


def dropped(x: torch.Tensor, p: float, seed: int, scale_mask: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(x) with the shared seeded mask (scaled by 1 / (1 - p))."""
    if p == 0.0:
        return x
    return x * (scale_mask if scale_mask is not None else mask_scale(x, p, seed))


def mask_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep_mask / (1 - p) in x's dtype (hashing is the slow part of this implementation: do it once)."""
    return keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device).to(x.dtype) * (1.0 / (1.0 - p))


def reference(x, w, bias, a, b, scaling, p=0.0, seed=0):
    """The formula as written, differentiated by autograd: what the tests compare against."""
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(dropped(x, p, seed), a), b)


def forward(x, w, bias, a, b, scaling, p, seed):
    h = dropped(x, p, seed)
    # skinny products with the rank-r side on the left: (r, in) @ (in, T) is 2-4x faster on CPU than
    # (T, in) @ (in, r) (benchmarks/kernels/README.md), and no slower on GPU
    xa = (a @ h.t()).t().contiguous()  # (T, r)
    y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    y.addmm_(xa, b.t(), alpha=scaling)  # the LoRA term lands in y without a (T, out) temporary
    return y, xa


def backward(dy, x, w, a, b, xa, scaling, p, seed, needs):
    need_dx, need_dw, need_dbias, need_da, need_db = needs
    gt = b.t() @ dy.t() if (need_dx or need_da) else None  # (dy B)^T, (r, T), unscaled
    m = mask_scale(x, p, seed) if p > 0 and (need_dx or need_da) else None
    dx = da = None
    if need_dx:
        dx = dy @ w
        if p == 0.0:
            dx.addmm_(gt.t(), a, alpha=scaling)
        else:
            dx += dropped(gt.t() @ a, p, seed, m).mul_(scaling)  # d dropout(x) / dx: the same mask and scale
    if need_da:
        da = (gt @ dropped(x, p, seed, m)).mul_(scaling)  # (r, in)
    db = (xa.t() @ dy).mul_(scaling).t().contiguous() if need_db else None  # (out, r) from (r, out)
    dw = dy.t() @ x if need_dw else None
    dbias = dy.sum(0) if need_dbias else None
    return dx, dw, dbias, da, db


def conformance_case(generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Small inputs of this op for the kernel conformance kit: (forward arguments, backward arguments
    given the forward's outputs and an upstream gradient). Every implementation's forward/backward
    must match this module's on them."""
    x = torch.randn(6, 24, generator=generator).to(dtype)
    w, bias = torch.randn(20, 24, generator=generator).to(dtype), torch.randn(20, generator=generator).to(dtype)
    a, b = torch.randn(4, 24, generator=generator).to(dtype), torch.randn(20, 4, generator=generator).to(dtype)
    dy = torch.randn(6, 20, generator=generator).to(dtype)
    fwd = (x, w, bias, a, b, 0.5, 0.0, 0)

    def bwd(outputs):
        return (dy, x, w, a, b, outputs[1], 0.5, 0.0, 0, (True, True, True, True, True))

    return fwd, bwd
