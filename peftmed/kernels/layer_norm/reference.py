"""layer_norm in plain PyTorch: the test oracle, and the ``torch`` implementation (the fallback).

Every implementation provides (x, dy 2-D (rows, N) contiguous; mean and rstd fp32, shape (rows,)):

    forward(x, w, b, eps) -> (y, mean, rstd)
    backward(dy, x, w, mean, rstd, needs) -> (dx, dw, db)     needs: 3 bools; unneeded may be None

Only mean and rstd are saved beyond the inputs. The backward is the textbook one:
    xhat = (x - mean) * rstd,  g = dy * w
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     dw = sum_rows(dy * xhat)   db = sum_rows(dy)
with the row sums of dw and db accumulated in fp32. For fp32 and fp64 inputs the fallback calls
torch's own fused CPU/CUDA kernels (native_layer_norm and its backward: the same contract, and the
fastest a pure-PyTorch fallback can be); for bf16/fp16 those keep the statistics in the input dtype,
so the formula above runs in fp32 instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference(x, w, b, eps=1e-5):
    """torch's own layer_norm, differentiated by autograd: what the tests compare against."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


NATIVE = (torch.float32, torch.float64)


def autograd(x, w, b, eps):
    """fp32/fp64: torch's own layer_norm under torch's own autograd, which an eager call takes instead of peftmed's
    autograd.Function (the same kernels as forward/backward below, without a Python backward node: on a row of 32
    a call costs half); None for bf16/fp16, whose statistics this implementation keeps in fp32."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps) if x.dtype in NATIVE else None


def forward(x, w, b, eps):
    if x.dtype in NATIVE:
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[1],), w, b, eps)
        return y, mean.view(-1), rstd.view(-1)
    x32 = x.float()
    var, mean = torch.var_mean(x32, dim=1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = torch.addcmul(b.float(), (x32 - mean[:, None]) * rstd[:, None], w.float())
    return y.to(x.dtype), mean, rstd


def backward(dy, x, w, mean, rstd, needs):
    need_dx, need_dw, need_db = needs
    if x.dtype in NATIVE:
        # the bias argument only tells the kernel that db is wanted: w stands in for it
        return torch.ops.aten.native_layer_norm_backward(
            dy, x, [x.shape[1]], mean.view(-1, 1), rstd.view(-1, 1), w, w, [need_dx, need_dw, need_db])
    dy32 = dy.float()
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dx = dw = db = None
    if need_dx:
        g = dy32 * w.float()
        c1 = (g * xhat).mean(1, keepdim=True)
        c2 = g.mean(1, keepdim=True)
        dx = ((g - c2 - xhat * c1) * rstd[:, None]).to(x.dtype)
    if need_dw:
        dw = (dy32 * xhat).sum(0).to(w.dtype)
    if need_db:
        db = dy32.sum(0).to(w.dtype)
    return dx, dw, db


def conformance_case(generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Small inputs of this op for the kernel conformance kit (see lora_linear.reference)."""
    x, dy = torch.randn(6, 24, generator=generator).to(dtype), torch.randn(6, 24, generator=generator).to(dtype)
    w, b = torch.randn(24, generator=generator).to(dtype), torch.randn(24, generator=generator).to(dtype)

    def bwd(outputs):
        return (dy, x, w, outputs[1], outputs[2], (True, True, True))

    return (x, w, b, 1e-5), bwd
