"""The ``prefix_attention`` op: input checks, dispatch, autograd, and its torch.library registration
(``peftmed::prefix_attention_fwd`` / ``_bwd``, used under torch.compile; eager calls use a lighter
autograd.Function, as lora_linear and layer_norm do).

Only out (B, H, Tq, D) and the fp32 log-sum-exp (B, H, Tq) are saved beyond the inputs: no
concatenated keys/values, no per-sample prefix copies, no attention probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ShapeError
from ..dropout import new_seed, threshold
from ..registry import KernelInputError, dispatch, dispatch_key, resolved
from .reference import plain_attention

OP = "prefix_attention"


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check(q, k, v, pk, pv) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"prefix_attention: q, k, v must be (B, H, T, D); got q {_shape(q)}, k {_shape(k)}, "
                         f"v {_shape(v)}")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ShapeError(f"prefix_attention: keys {_shape(k)} and values {_shape(v)} must be ({b}, {h}, Tk, {d}) "
                         f"to match the queries {_shape(q)}")
    if pk.shape != pv.shape or pk.dim() != 3:
        raise ShapeError(f"prefix_attention: prefix keys {_shape(pk)} and values {_shape(pv)} must both be "
                         f"(H, P, D), one copy shared by the batch")
    if pk.shape[0] != h or pk.shape[2] != d:
        raise ShapeError(f"prefix_attention: the prefix has {pk.shape[0]} heads of dim {pk.shape[2]} "
                         f"({_shape(pk)}) but the sequence has {h} heads of dim {d} (q {_shape(q)}); "
                         f"build the prefix with the attention module's num_heads and head_dim")
    for name, t in (("k", k), ("v", v), ("prefix_k", pk), ("prefix_v", pv)):
        if t.dtype != q.dtype or t.device != q.device:
            raise KernelInputError(f"prefix_attention: {name} is {t.dtype} on {t.device} but q is {q.dtype} on "
                                   f"{q.device}; cast them to one dtype and device")


def normalise_mask(mask, b: int, h: int, tq: int, tk: int):
    """A padding mask (True/1 = attend; (B, Tk) or broadcastable to (B, H, Tq, Tk)) as a 4-D bool
    tensor with size-1 broadcast dimensions kept (never expanded), or None."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask > 0.5
    if m.dim() == 2:
        m = m[:, None, None, :]  # (B, Tk) padding
    if m.dim() > 4:
        raise ShapeError(f"prefix_attention: attention mask {_shape(mask)} has more than 4 dimensions; "
                         f"expected (B, Tk) or broadcastable to (B, H, Tq, Tk) = {(b, h, tq, tk)}")
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    if any(s not in (1, t) for s, t in zip(m.shape, (b, h, tq, tk))):
        raise ShapeError(f"prefix_attention: attention mask {_shape(mask)} does not broadcast to "
                         f"(B, H, Tq, Tk) = {(b, h, tq, tk)}; expected (B, Tk) padding or a shape broadcastable to it")
    return m


class _PrefixAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, mask, causal, scale, p, seed, fns):
        out, lse = fns["forward"](q, k, v, pk, pv, mask, causal, scale, p, seed)
        keep_out = fns["needs_out"](q, p) if "needs_out" in fns else True
        ctx.save_for_backward(q, k, v, pk, pv, out if keep_out else None, lse)
        ctx.args = (mask, causal, scale, p, seed, fns)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        mask, causal, scale, p, seed, fns = ctx.args
        grads = fns["backward"](dout.contiguous(), q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse)
        return (*grads, None, None, None, None, None, None)


def prefix_attention(q, k, v, prefix_k, prefix_v, mask=None, *, causal=False, scale=None, dropout_p=0.0,
                     impl=None, registry=None):
    """softmax(q [prefix_k; k]^T * scale) [prefix_v; v] with the prefix always visible.

    q (B, H, Tq, D); k, v (B, H, Tk, D); prefix_k, prefix_v (H, P, D), one copy for the batch
    (never repeated per sample); ``mask``: True/1 = attend, (B, Tk) or broadcastable to
    (B, H, Tq, Tk), over the sequence keys only; ``causal``: sequence key j is visible to query i
    iff j <= i + Tk - Tq; ``scale`` defaults to 1/sqrt(D); ``dropout_p`` drops attention
    probabilities (pass 0 in eval). An empty prefix (P = 0) is plain attention. ``registry``: where to find
    the implementations (the model's; None: the default registry).
    """
    _check(q, k, v, prefix_k, prefix_v)
    b, h, tq, _ = q.shape
    mask = normalise_mask(mask, b, h, tq, k.shape[2])
    p = float(dropout_p)
    threshold(p)  # rejects p outside [0, 1) with a clear message
    scale = None if scale is None else float(scale)
    if prefix_k.shape[1] == 0:
        return plain_attention(q, k, v, mask, causal, scale, p)
    pk, pv = prefix_k, prefix_v
    if torch.compiler.is_compiling():  # the same dispatch, its key a constant of the graph
        key = dispatch_key(OP, impl, q.device.type, q.dtype, q.shape[-1], registry)
        q, k, v, pk, pv = (t.contiguous() for t in (q, k, v, pk, pv))
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else torch.zeros((), dtype=torch.int64)
        out, _ = prefix_attention_fwd(q, k, v, pk, pv, mask, causal, scale, p, seed, key)
        return out
    _, kernel, fns = dispatch(OP, impl, q.device, q.dtype, q.shape[-1], registry)
    if kernel.name != "torch" or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        # the GPU kernels index contiguous rows; the torch implementation takes strided views as they
        # come (a head-split (B, T, H, D) -> (B, H, T, D) view is not copied, and a prefix that is a
        # view of the prompt parameters is not copied once per layer and kept for backward)
        q, k, v, pk, pv = (t.contiguous() for t in (q, k, v, pk, pv))
    seed = new_seed() if p > 0 else 0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, pk, pv)):
        return _PrefixAttentionFunction.apply(q, k, v, pk, pv, mask, bool(causal), scale, p, seed, fns)
    return fns["forward"](q, k, v, pk, pv, mask, bool(causal), scale, p, seed)[0]


# ---- torch.library registration (what torch.compile traces) ----------------------------------------
@torch.library.custom_op("peftmed::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, mask: Tensor | None,
                         causal: bool, scale: float | None, p: float, seed: Tensor, key: str
                         ) -> tuple[Tensor, Tensor]:
    out, lse = resolved(key)["forward"](q, k, v, pk, pv, mask, causal, scale, p, int(seed))
    return out, lse.contiguous()


@prefix_attention_fwd.register_fake
def _(q, k, v, pk, pv, mask, causal, scale, p, seed, key):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("peftmed::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor,
                         mask: Tensor | None, causal: bool, scale: float | None, p: float, seed: Tensor,
                         out: Tensor, lse: Tensor, key: str) -> list[Tensor]:
    grads = resolved(key)["backward"](dout.contiguous(), q, k, v, pk, pv, mask, causal, scale, p, int(seed), out,
                                      lse)
    return [g.contiguous() for g in grads]


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse, key):
    return [torch.empty_like(t) for t in (q, k, v, pk, pv)]


def _setup(ctx, inputs, output):
    q, k, v, pk, pv, mask, causal, scale, p, seed, key = inputs
    ctx.save_for_backward(q, k, v, pk, pv, output[0], output[1], seed)
    ctx.mask, ctx.args = mask, (causal, scale, p, key)


def _backward(ctx, dout, _dlse):
    q, k, v, pk, pv, out, lse, seed = ctx.saved_tensors
    causal, scale, p, key = ctx.args
    grads = prefix_attention_bwd(dout, q, k, v, pk, pv, ctx.mask, causal, scale, p, seed, out, lse, key)
    return (*grads, None, None, None, None, None, None)


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup)
