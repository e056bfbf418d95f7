"""The ``lora_linear`` op: input checks, dispatch, autograd, and its torch.library registration.

Eager calls go through a small ``torch.autograd.Function`` (the cheapest path: a custom op costs
about 50 us more per step); under ``torch.compile`` the same forward/backward run inside the custom
ops ``peftmed::lora_linear_fwd`` / ``peftmed::lora_linear_bwd`` so the compiler sees one opaque node
with a fake (shape-only) implementation and a registered backward. Both paths dispatch once, through the
registry the model was applied with (``registry.resolve``; under torch.compile ``dispatch_key``: the custom ops
receive the decision's key).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ShapeError
from ..dropout import new_seed
from ..registry import KernelInputError, dispatch_key, resolve, resolved

OP = "lora_linear"


def _check(x, w, bias, a, b) -> None:
    d_in = x.shape[-1]
    if w.dim() == 2 and a.dim() == 2 and b.dim() == 2 and w.shape[1] == d_in and a.shape[1] == d_in \
            and b.shape[0] == w.shape[0] and b.shape[1] == a.shape[0] \
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == w.shape[0])) \
            and w.dtype == x.dtype and a.dtype == x.dtype and b.dtype == x.dtype \
            and (bias is None or bias.dtype == x.dtype) and w.device == x.device and a.device == x.device \
            and b.device == x.device and (bias is None or bias.device == x.device):
        return  # the common case in one expression (this runs on every call); the messages below name what is wrong
    if w.dim() != 2 or w.shape[1] != d_in:
        raise ShapeError(f"lora_linear: x has shape {tuple(x.shape)} (last dim {d_in}) but weight has shape "
                         f"{tuple(w.shape)}; expected weight (out_features, {d_in})")
    d_out = w.shape[0]
    if a.dim() != 2 or a.shape[1] != d_in:
        raise ShapeError(f"lora_linear: lora_a has shape {tuple(a.shape)} but x has shape {tuple(x.shape)}; "
                         f"expected lora_a (r, {d_in})")
    r = a.shape[0]
    if tuple(b.shape) != (d_out, r):
        raise ShapeError(f"lora_linear: lora_b has shape {tuple(b.shape)} but weight has shape {tuple(w.shape)} "
                         f"and lora_a {tuple(a.shape)}; expected lora_b ({d_out}, {r})")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ShapeError(f"lora_linear: bias has shape {tuple(bias.shape)} but weight has shape "
                         f"{tuple(w.shape)}; expected bias ({d_out},)")
    for name, t in (("weight", w), ("bias", bias), ("lora_a", a), ("lora_b", b)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise KernelInputError(f"lora_linear: {name} is {t.dtype} on {t.device} but x is {x.dtype} on "
                                   f"{x.device}; cast them to one dtype and device")


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, a, b, scaling, p, seed, fns):
        y, xa = fns["forward"](x, w, bias, a, b, scaling, p, seed)
        ctx.save_for_backward(x, w, a, b, xa)
        ctx.args = (scaling, p, seed, fns)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, xa = ctx.saved_tensors
        scaling, p, seed, fns = ctx.args
        needs = tuple(ctx.needs_input_grad[:5])
        grads = fns["backward"](dy.contiguous(), x, w, a, b, xa, scaling, p, seed, needs)
        return (*grads, None, None, None, None)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False, impl=None, registry=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T  (A: (r, in), B: (out, r)); x: (..., in).

    ``registry``: where to find the implementations (the model's; None: the default registry)."""
    _check(x, weight, bias, lora_a, lora_b)
    p = float(dropout_p) if training else 0.0
    d_in, d_out = x.shape[-1], weight.shape[0]
    flat = x.dim() == 2
    x2 = x.contiguous() if flat else x.reshape(-1, d_in).contiguous()  # a copy only when x is not row-contiguous
    w, a, b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
    if torch.compiler.is_compiling():  # the same dispatch, its key a constant of the graph
        key = dispatch_key(OP, impl, x.device.type, x.dtype, a.shape[0], registry)
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else torch.zeros((), dtype=torch.int64)
        y, _ = lora_linear_fwd(x2, w, bias, a, b, float(scaling), p, seed, key)
        return y if flat else y.view(*x.shape[:-1], d_out)
    _, fns = resolve(OP, impl, x.device, x.dtype, a.shape[0], registry)  # eager: no key for a custom op needed
    seed = new_seed() if p > 0 else 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_a.requires_grad
                                    or lora_b.requires_grad or (bias is not None and bias.requires_grad)):
        y = _LoraLinearFunction.apply(x2, w, bias, a, b, float(scaling), p, seed, fns)
    else:
        y, _ = fns["forward"](x2, w, bias, a, b, float(scaling), p, seed)
    return y if flat else y.view(*x.shape[:-1], d_out)


# ---- torch.library registration (what torch.compile traces) ----------------------------------------
@torch.library.custom_op("peftmed::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                    p: float, seed: Tensor, key: str) -> tuple[Tensor, Tensor]:
    y, xa = resolved(key)["forward"](x, w, bias, a, b, scaling, p, int(seed))
    return y, xa


@lora_linear_fwd.register_fake
def _(x, w, bias, a, b, scaling, p, seed, key):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("peftmed::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, w: Tensor, a: Tensor, b: Tensor, xa: Tensor, scaling: float,
                    p: float, seed: Tensor, needs: list[bool], key: str) -> list[Tensor]:
    grads = resolved(key)["backward"](dy.contiguous(), x, w, a, b, xa, scaling, p, int(seed), tuple(needs))
    # custom ops cannot return None (an empty tensor means "not needed") nor one tensor twice
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_linear_bwd.register_fake
def _(dy, x, w, a, b, xa, scaling, p, seed, needs, key):
    shapes = (x.shape, w.shape, (w.shape[0],), a.shape, b.shape)
    return [x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]


def _setup(ctx, inputs, output):
    x, w, bias, a, b, scaling, p, seed, key = inputs
    ctx.save_for_backward(x, w, a, b, output[1], seed)
    ctx.args = (scaling, p, key, bias is not None)


def _backward(ctx, dy, _dxa):
    x, w, a, b, xa, seed = ctx.saved_tensors
    scaling, p, key, has_bias = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    needs[2] = needs[2] and has_bias
    grads = lora_linear_bwd(dy, x, w, a, b, xa, scaling, p, seed, needs, key)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)
