"""The one attention entry point of peftmed's models: softmax attention with optional key/value
prefixes (the prompt-family methods) and padding / causal masks.

Attention modules that can take prefixes follow a small protocol (the prompt-family methods rely on
it; the backbone's role map names them with the roles ``self_attention`` / ``cross_attention``):

    module.num_heads: int
    module.head_dim: int
    module.prefix_provider: None | Callable[[], tuple[Tensor, Tensor]]
        when set, returns (prefix_k, prefix_v), each (H, P, D) shared by the whole batch (or
        (B, H, P, D)); the module passes them to ``attend(..., prefix=...)``. A :class:`PrefixKV` (what
        the prompt methods return) also carries the kernel registry of the model it belongs to.

``attend`` sends a shared (H, P, D) prefix to the ``prefix_attention`` kernel op (attend to the
prefix and to the sequence separately, merge by log-sum-exp: the prefix is never concatenated nor
repeated per sample); a per-sample (B, H, P, D) prefix, ``impl="reference"``, or no implementation
able to run the call use the explicit reference below (which is also the test oracle).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import ShapeError
from .kernels.prefix_attention.op import prefix_attention
from .kernels.registry import KernelUnavailableError

log = logging.getLogger("peftmed.attention")
REFERENCE = "reference"  # attend(impl=...) name of the explicit concatenation path


class PrefixKV(tuple):
    """``(prefix_k, prefix_v)`` plus ``registry``, the kernel registry of the model the prefix belongs to,
    so ``attend`` dispatches ``prefix_attention`` through it (None: the default registry)."""

    def __new__(cls, prefix_k: torch.Tensor, prefix_v: torch.Tensor, registry=None):
        obj = super().__new__(cls, (prefix_k, prefix_v))
        obj.registry = registry
        return obj


def check_prefix(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
    if prefix_k.shape != prefix_v.shape:
        raise ShapeError(f"prefix keys {tuple(prefix_k.shape)} and values {tuple(prefix_v.shape)} differ in shape")
    if prefix_k.dim() not in (3, 4):
        raise ShapeError(f"prefix keys must be (H, P, D) or (B, H, P, D), got {tuple(prefix_k.shape)}")
    h, d = prefix_k.shape[-3], prefix_k.shape[-1]
    if h != q.shape[1] or d != q.shape[-1]:
        raise ShapeError(
            f"prefix has {h} heads of dim {d} ({tuple(prefix_k.shape)}) but the queries have "
            f"{q.shape[1]} heads of dim {q.shape[-1]} ({tuple(q.shape)})"
        )


def bool_mask(attn_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """Combine a padding mask (True/1 = attend; (B, Tk), or broadcastable to (B, H, Tq, Tk)) with
    causality into one boolean mask broadcastable to (B, H, Tq, Tk)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask > 0.5
        if mask.dim() == 2:  # (B, Tk)
            mask = mask[:, None, None, :]
        if mask.shape[-1] != k_len:
            raise ShapeError(f"attention mask {tuple(attn_mask.shape)} does not cover {k_len} keys")
    if causal:
        c = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = c if mask is None else mask & c
    return mask


def attend_reference(q, k, v, *, prefix=None, attn_mask=None, causal=False, dropout_p=0.0, scale=None):
    """Reference: concatenate [prefix; keys] explicitly (repeating the prefix per sample) + softmax."""
    b, h, tq, d = q.shape
    mask = bool_mask(attn_mask, tq, k.shape[-2], causal, q.device)
    if prefix is not None and prefix[0].shape[-2] > 0:
        pk, pv = prefix
        check_prefix(q, pk, pv)
        if pk.dim() == 3:
            pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # a causal-only mask is (Tq, Tk)
            mask = torch.broadcast_to(mask, (mask.shape[0], mask.shape[1], tq, mask.shape[-1]))
            ones = torch.ones(*mask.shape[:-1], pk.shape[-2], dtype=torch.bool, device=mask.device)
            mask = torch.cat([ones, mask], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def attend(q, k, v, *, prefix=None, attn_mask=None, causal=False, dropout_p=0.0, scale=None, impl=None):
    """Softmax attention of q (B, H, Tq, D) over [prefix; k] with the prefix always visible.

    ``attn_mask``: True/1 = attend; (B, Tk) padding or broadcastable to (B, H, Tq, Tk).
    ``causal`` applies to the sequence keys only.
    ``impl``: the prefix_attention implementation (None/"auto", "triton", "cuda", "torch", ...), or
    "reference" for the explicit concatenation.
    """
    if prefix is None or prefix[0].shape[-2] == 0:
        mask = bool_mask(attn_mask, q.shape[-2], k.shape[-2], causal, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    pk, pv = prefix
    check_prefix(q, pk, pv)
    if pk.dim() == 4 or impl == REFERENCE:
        return attend_reference(q, k, v, prefix=prefix, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p,
                                scale=scale)

    try:
        return prefix_attention(q, k, v, pk.to(q.dtype), pv.to(q.dtype), attn_mask, causal=causal, scale=scale,
                                dropout_p=dropout_p, impl=impl, registry=getattr(prefix, "registry", None))
    except KernelUnavailableError as exc:
        if impl not in (None, "auto"):
            raise
        if not _warned:
            _warned.append(True)
            log.warning("prefix_attention: %s; using the concatenation reference", exc)
        return attend_reference(q, k, v, prefix=prefix, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p,
                                scale=scale)


_warned: list[bool] = []
