"""prefix_attention in plain PyTorch: the test oracle, and the ``torch`` implementation (the fallback).

Softmax attention of q over [prefix; sequence], the prefix shared by the whole batch and always
visible. Every implementation provides (shapes: q (B, H, Tq, D); k, v (B, H, Tk, D); pk, pv
(H, P, D), P >= 1, one copy for the whole batch; mask None or bool (B|1, H|1, Tq|1, Tk), True =
attend; causal: sequence key j is visible to query i iff j <= i + Tk - Tq, as a KV cache needs;
lse fp32 (B, H, Tq), the log-sum-exp of the scaled scores over [prefix; sequence]):

    forward(q, k, v, pk, pv, mask, causal, scale, p, seed) -> (out, lse)
    backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse) -> (dq, dk, dv, dpk, dpv)

The prefix and the sequence are attended separately and merged by log-sum-exp:
    out = exp(lse_p - lse) * out_p + exp(lse_s - lse) * out_s,    lse = logaddexp(lse_p, lse_s)
and the backward runs each branch with the *merged* out and lse (so each branch's probabilities are
those of the full softmax) and adds the two query gradients; dpk/dpv sum over the batch.
Dropout (p > 0) drops probabilities with the shared hash of peftmed.kernels.dropout: row
(b * H + h) * Tq + i, column j over [prefix; sequence] (prefix first), regenerated in backward.

This file's ``forward``/``backward``: on CPU without dropout, torch's flash-attention CPU kernels
(which return the log-sum-exp) once per branch, the prefix broadcast with stride 0; otherwise the
same formulas with explicit matmuls, recomputing the probabilities in backward (only out and lse
are saved, never the (Tq, P + Tk) probabilities).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dropout import keep_mask

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference(q, k, v, pk, pv, mask=None, causal=False, scale=None, p=0.0, seed=0):
    """The concatenation [prefix; sequence] made explicit (prefix repeated per sample), softmax in
    fp32, differentiated by autograd: what the tests compare against."""
    b, h, tq, d = q.shape
    tk, n = k.shape[2], pk.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = torch.cat([pk.float().expand(b, -1, -1, -1), k.float()], dim=2)
    values = torch.cat([pv.float().expand(b, -1, -1, -1), v.float()], dim=2)
    visible = sequence_mask(mask, causal, tq, tk, q.device)
    scores = q.float() @ keys.transpose(-1, -2) * scale  # (B, H, Tq, P + Tk)
    if visible is not None:
        scores[..., n:] = scores[..., n:].masked_fill(~visible, float("-inf"))
    probs = scores.softmax(-1)
    if p > 0:
        keep = keep_mask(seed, b * h * tq, n + tk, p, q.device).view(b, h, tq, n + tk)
        probs = probs * keep / (1 - p)
    return (probs @ values).to(q.dtype)


def sequence_mask(mask, causal, tq, tk, device):
    """The bool visibility of the sequence keys, broadcastable to (B, H, Tq, Tk), or None (all)."""
    if causal:
        tri = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
        return tri if mask is None else mask & tri
    return mask


def _additive(visible, dtype):
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def _flash_args(mask, causal, tq, tk, dtype):
    """(is_causal, additive mask) for the CPU flash kernel: its own causal path when it agrees
    with ours (Tq == Tk, top-left = bottom-right), else the visibility as an additive mask."""
    if causal and mask is None and tq == tk:
        return True, None
    visible = sequence_mask(mask, causal, tq, tk, None if mask is None else mask.device)
    return False, None if visible is None else _additive(visible, dtype)


def _no_visible_key(mask, causal, tq, tk, device):
    """(B|1, H|1, Tq) True where a query sees no sequence key (its branch has no softmax), or None."""
    if mask is None and not (causal and tq > tk):
        return None
    visible = sequence_mask(mask, causal, tq, tk, device)
    return ~visible.any(-1)


def _use_flash(q, p):
    return q.device.type == "cpu" and p == 0 and q.dtype in FLASH_DTYPES


def needs_out(q, p) -> bool:
    """Whether backward reads ``out`` (the flash kernels do; the explicit-matmul path does not, so the
    op does not keep it for backward there)."""
    return _use_flash(q, p)


# Up to this many keys ([prefix; sequence]) the CPU path runs ONE flash call on a concatenation made
# inside the op and dropped when it returns (never saved for backward, so the memory a training step
# holds is the same as the two-branch path's): at short sequences the two-branch path's extra calls
# and merge cost more than the copy (benchmarks/kernels/README.md).
CONCAT_MAX_KEYS = 160
# Longer sequences attend to the prefix a slice of the batch at a time, merged into the sequence
# branch's output in place, so the prefix branch's (b, H, Tq, D) output and query gradient exist for
# a slice only (about this many bytes) and never for the whole batch beside the sequence branch's.
PREFIX_CHUNK_BYTES = 16 * 2**20


def _short(q, k, pk):
    return pk.shape[1] + k.shape[2] <= CONCAT_MAX_KEYS


def _joined(q, k, v, pk, pv, mask, causal, tq, tk):
    """[prefix; sequence] keys and values (a transient copy) and the flash kernel's additive mask."""
    b, n = q.shape[0], pk.shape[1]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    visible = sequence_mask(mask, causal, tq, tk, None if mask is None else mask.device)
    if visible is None:
        return keys, values, None
    add = torch.zeros((*visible.shape[:-1], n + tk), dtype=q.dtype, device=q.device)  # prefix: always visible
    add[..., n:].masked_fill_(~visible, float("-inf"))
    return keys, values, add


def _chunks(q):
    b = q.shape[0]
    per_sample = q[0].numel() * q.element_size()
    step = max(1, min(b, PREFIX_CHUNK_BYTES // max(per_sample, 1)))
    return [slice(i, min(i + step, b)) for i in range(0, b, step)]


def forward(q, k, v, pk, pv, mask, causal, scale, p, seed):
    if not _use_flash(q, p):
        return _math_forward(q, k, v, pk, pv, mask, causal, scale, p, seed)
    tq, tk = q.shape[2], k.shape[2]
    if _short(q, k, pk):
        keys, values, add = _joined(q, k, v, pk, pv, mask, causal, tq, tk)
        return _flash_fwd(q, keys, values, 0.0, False, attn_mask=add, scale=scale)
    is_causal, add = _flash_args(mask, causal, tq, tk, q.dtype)
    out, lse_s = _flash_fwd(q, k, v, 0.0, is_causal, attn_mask=add, scale=scale)  # out follows q's layout
    blind = _no_visible_key(mask, causal, tq, tk, q.device)
    if blind is not None:  # the flash kernel reports lse 0 there; the branch must weigh nothing
        lse_s = lse_s.masked_fill(blind, float("-inf"))
    lse = torch.empty_like(lse_s)
    for sl in _chunks(q):
        n = q[sl].shape[0]
        out_p, lse_p = _flash_fwd(q[sl], pk.expand(n, -1, -1, -1), pv.expand(n, -1, -1, -1), 0.0, False, scale=scale)
        merged = torch.logaddexp(lse_p, lse_s[sl])
        o = out[sl]
        res = o.float() * (lse_s[sl] - merged).exp()[..., None] + out_p.float() * (lse_p - merged).exp()[..., None]
        o.copy_(res)
        lse[sl] = merged
    return out, lse


def backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse):
    if not _use_flash(q, p):
        return _math_backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse)
    tq, tk = q.shape[2], k.shape[2]
    if _short(q, k, pk):
        n = pk.shape[1]
        keys, values, add = _joined(q, k, v, pk, pv, mask, causal, tq, tk)
        dq, dkeys, dvalues = _flash_bwd(dout, q, keys, values, out, lse, 0.0, False, attn_mask=add, scale=scale)
        return (dq, dkeys[:, :, n:], dvalues[:, :, n:], dkeys[:, :, :n].sum(0, dtype=torch.float32).to(pk.dtype),
                dvalues[:, :, :n].sum(0, dtype=torch.float32).to(pv.dtype))
    is_causal, add = _flash_args(mask, causal, tq, tk, q.dtype)
    dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=add, scale=scale)
    dpk = torch.zeros(pk.shape, dtype=torch.float32, device=pk.device)
    dpv = torch.zeros(pv.shape, dtype=torch.float32, device=pv.device)
    for sl in _chunks(q):  # the prefix branch, a slice of the batch at a time, added into dq in place
        n = q[sl].shape[0]
        dq_p, dpk_c, dpv_c = _flash_bwd(dout[sl], q[sl], pk.expand(n, -1, -1, -1), pv.expand(n, -1, -1, -1),
                                        out[sl], lse[sl], 0.0, False, scale=scale)
        dq[sl] += dq_p
        dpk += dpk_c.sum(0, dtype=torch.float32)
        dpv += dpv_c.sum(0, dtype=torch.float32)
    return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)


# ---- explicit matmuls: any device, fp64, dropout ------------------------------------------------
def _scores(q, k, pk, mask, causal, scale):
    """fp32 scores of the prefix (B, H, Tq, P) and of the sequence (B, H, Tq, Tk), masked."""
    qf = q.float() * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    s_p = torch.einsum("bhqd,hpd->bhqp", qf, pk.float())  # einsum folds B into Tq: pk is not repeated
    s_s = qf @ k.float().transpose(-1, -2)
    visible = sequence_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    if visible is not None:
        s_s = s_s.masked_fill(~visible, float("-inf"))
    return s_p, s_s


def _keeps(q, n, tk, p, seed):
    b, h, tq, _ = q.shape
    keep = keep_mask(seed, b * h * tq, n + tk, p, q.device).view(b, h, tq, n + tk)
    return keep[..., :n], keep[..., n:]


# The two functions below work in place where they can and drop each (B, H, Tq, P|Tk) temporary as
# soon as it is used: in a training step they run while every activation is held, so their transient
# memory adds to the step's peak.
def _math_forward(q, k, v, pk, pv, mask, causal, scale, p, seed):
    s_p, s_s = _scores(q, k, pk, mask, causal, scale)
    lse = torch.logaddexp(s_p.logsumexp(-1), s_s.logsumexp(-1))  # (B, H, Tq)
    a_p, a_s = s_p.sub_(lse[..., None]).exp_(), s_s.sub_(lse[..., None]).exp_()  # probabilities, in place
    del s_p, s_s
    if p > 0:
        keep_p, keep_s = _keeps(q, pk.shape[1], k.shape[2], p, seed)
        a_p.mul_(keep_p).mul_(1 / (1 - p))
        a_s.mul_(keep_s).mul_(1 / (1 - p))
        del keep_p, keep_s
    res = torch.einsum("bhqp,hpd->bhqd", a_p, pv.float())
    del a_p
    res.add_(a_s @ v.float())
    del a_s
    # out in q's memory layout: when q's heads were split from (B, T, H*D), the caller's merge of the
    # heads is then a view (no copy of out for the output projection)
    out = torch.empty_like(q)
    out.copy_(res)
    return out, lse


def _math_backward(dout, q, k, v, pk, pv, mask, causal, scale, p, seed, out, lse):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s_p, s_s = _scores(q, k, pk, mask, causal, scale)
    a_p, a_s = s_p.sub_(lse[..., None]).exp_(), s_s.sub_(lse[..., None]).exp_()
    del s_p, s_s
    do, qf = dout.float(), q.float()
    dp_p = torch.einsum("bhqd,hpd->bhqp", do, pv.float())
    dp_s = do @ v.float().transpose(-1, -2)
    if p > 0:
        keep_p, keep_s = _keeps(q, pk.shape[1], k.shape[2], p, seed)
        dp_p.mul_(keep_p).mul_(1 / (1 - p))
        dp_s.mul_(keep_s).mul_(1 / (1 - p))
        # dV and dPV from the dropped probabilities, made and dropped one at a time
        dv = (a_s * keep_s).mul_(1 / (1 - p)).transpose(-1, -2) @ do
        dpv = torch.einsum("bhqp,bhqd->hpd", (a_p * keep_p).mul_(1 / (1 - p)), do)
        del keep_p, keep_s
    else:
        dv = a_s.transpose(-1, -2) @ do
        dpv = torch.einsum("bhqp,bhqd->hpd", a_p, do)
    # rowsum(dO * O), the softmax Jacobian term, from the probabilities recomputed above (out = P V, so
    # dO . O = sum_j P_ij (dO_i . V_j)): this path does not need out, and it is not kept (needs_out)
    delta = torch.linalg.vecdot(a_p, dp_p).unsqueeze_(-1) + torch.linalg.vecdot(a_s, dp_s).unsqueeze_(-1)
    ds_p = dp_p.sub_(delta).mul_(a_p)  # in place over dp
    ds_s = dp_s.sub_(delta).mul_(a_s)
    del a_p, a_s
    dq = torch.einsum("bhqp,hpd->bhqd", ds_p, pk.float()).add_(ds_s @ k.float()).mul_(scale)
    dk = (ds_s.transpose(-1, -2) @ qf).mul_(scale)
    dpk = torch.einsum("bhqp,bhqd->hpd", ds_p, qf).mul_(scale)  # summed over the batch
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(pk.dtype), dpv.to(pv.dtype)


def plain_attention(q, k, v, mask, causal, scale, p):
    """No prefix: torch's SDPA (what an empty prefix falls through to)."""
    visible = sequence_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p, scale=scale)


def conformance_case(generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Small inputs of this op for the kernel conformance kit (see lora_linear.reference): a padded batch,
    causal, a 3-token prefix."""
    q = torch.randn(2, 2, 5, 8, generator=generator).to(dtype)
    k, v = (torch.randn(2, 2, 7, 8, generator=generator).to(dtype) for _ in range(2))
    pk, pv = (torch.randn(2, 3, 8, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    dout = torch.randn(2, 2, 5, 8, generator=generator).to(dtype)
    fwd = (q, k, v, pk, pv, mask, True, None, 0.0, 0)

    def bwd(outputs):
        return (dout, q, k, v, pk, pv, mask, True, None, 0.0, 0, outputs[0], outputs[1])

    return fwd, bwd
