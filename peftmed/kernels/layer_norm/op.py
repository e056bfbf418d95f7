"""The ``layer_norm`` op (last dimension, with weight and bias): checks, dispatch, autograd, and
its torch.library registration (``peftmed::layer_norm_fwd`` / ``peftmed::layer_norm_bwd``, used
under torch.compile; eager calls use a lighter autograd.Function, as in lora_linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ShapeError
from ..registry import KernelInputError, dispatch_key, resolve, resolved

OP = "layer_norm"


def _check(x, w, b) -> None:
    n = x.shape[-1]
    for name, t in (("weight", w), ("bias", b)):
        if tuple(t.shape) != (n,):
            raise ShapeError(f"layer_norm: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}; "
                             f"expected {name} ({n},)")
        if t.dtype != x.dtype or t.device != x.device:
            raise KernelInputError(f"layer_norm: {name} is {t.dtype} on {t.device} but x is {x.dtype} on "
                                   f"{x.device}; cast them to one dtype and device")


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps, fns):
        y, mean, rstd = fns["forward"](x, w, b, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.fns = fns
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dx, dw, db = ctx.fns["backward"](dy.contiguous(), x, w, mean, rstd, needs)
        return dx, dw, db, None, None


def layer_norm(x, weight, bias, eps=1e-5, impl=None, registry=None):
    """LayerNorm over the last dimension of x with gain ``weight`` and shift ``bias`` (``registry``: where to
    find the implementations; None: the default registry)."""
    if weight is None or bias is None:  # no affine parameters: nothing for a fused backward to fuse
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    _check(x, weight, bias)
    n = x.shape[-1]
    if torch.compiler.is_compiling():  # the same dispatch, its key a constant of the graph
        key = dispatch_key(OP, impl, x.device.type, x.dtype, n, registry)
        y, _, _ = layer_norm_fwd(x.reshape(-1, n).contiguous(), weight, bias, float(eps), key)
        return y.view(x.shape)
    _, fns = resolve(OP, impl, x.device, x.dtype, n, registry)
    if "autograd" in fns:  # an implementation torch's autograd differentiates (the fp32 fallback): no Function
        y = fns["autograd"](x, weight, bias, float(eps))
        if y is not None:
            return y
    x2 = x.reshape(-1, n).contiguous()  # a copy only when x is not already row-contiguous
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        y = _LayerNormFunction.apply(x2, weight, bias, float(eps), fns)
    else:
        y = fns["forward"](x2, weight, bias, float(eps))[0]
    return y.view(x.shape)


# ---- torch.library registration (what torch.compile traces) ----------------------------------------
@torch.library.custom_op("peftmed::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, w: Tensor, b: Tensor, eps: float, key: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(resolved(key)["forward"](x, w, b, eps))


@layer_norm_fwd.register_fake
def _(x, w, b, eps, key):
    rows = x.shape[0]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("peftmed::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, w: Tensor, mean: Tensor, rstd: Tensor, needs: list[bool],
                   key: str) -> list[Tensor]:
    grads = resolved(key)["backward"](dy.contiguous(), x, w, mean, rstd, tuple(needs))
    # custom ops cannot return None (an empty tensor means "not needed") nor one tensor twice
    return [g if g is not None else x.new_empty(0) for g in grads]


@layer_norm_bwd.register_fake
def _(dy, x, w, mean, rstd, needs, key):
    return [x.new_empty(s if need else (0,)) for s, need in zip((x.shape, w.shape, w.shape), needs)]


def _setup(ctx, inputs, output):
    x, w, b, eps, key = inputs
    ctx.save_for_backward(x, w, output[1], output[2])
    ctx.key = key


def _backward(ctx, dy, _dmean, _drstd):
    x, w, mean, rstd = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = layer_norm_bwd(dy, x, w, mean, rstd, needs, ctx.key)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup)
