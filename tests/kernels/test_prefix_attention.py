"""prefix_attention against the explicit concatenation (the oracle, differentiated by autograd): out
and the gradients of q, k, v and the shared prefix, over random shapes, padding masks, causal and
not, dropout, fp32 and bf16; attend() wiring; bad input; what the op saves for backward."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftmed import kernels
from peftmed.attention import attend, attend_reference
from peftmed.errors import ShapeError
from peftmed.kernels.build import CSRC
from peftmed.kernels.prefix_attention.op import _PrefixAttentionFunction, prefix_attention
from peftmed.kernels.prefix_attention.reference import reference

from kernels_testlib import assert_close, triton_runs_here

# impl -> (can it run here, hypothesis examples); the interpreter runs Triton at a few ms per program
IMPLS = {"torch": (lambda: (True, ""), 30), "triton": (triton_runs_here, 8)}


def make_inputs(b, h, tq, tk, n, d, mask_kind, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for t in (tq, tk, tk))
    pk, pv = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    mask = None
    if mask_kind == "padding":  # (B, Tk); sample 0 fully padded: only the prefix is left to it
        mask = torch.rand(b, tk, generator=g) > 0.3
        mask[0] = False
    elif mask_kind == "full":  # (B, 1, Tq, Tk), broadcast over heads
        mask = torch.rand(b, 1, tq, tk, generator=g) > 0.5
    dout = torch.randn(b, h, tq, d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v, pk, pv)], mask if mask is None else mask.to(device), dout.to(device, dtype)


def check_against_oracle(impl, b, h, tq, tk, n, d, causal, mask_kind, dtype, p, seed):
    device = "cuda" if impl in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    ins, mask, dout = make_inputs(b, h, tq, tk, n, d, mask_kind, dtype, seed, device)
    ins = [t.requires_grad_() for t in ins]
    _, fns = kernels.resolve("prefix_attention", impl, device, dtype, d)
    m4 = None if mask is None else (mask[:, None, None, :] if mask.dim() == 2 else mask)
    out = _PrefixAttentionFunction.apply(*ins, m4, causal, None, p, seed, fns)
    grads = torch.autograd.grad(out, ins, dout)
    ref_ins = [t.detach().float().cpu().requires_grad_() for t in ins]
    ref_mask = None if m4 is None else m4.cpu()
    ref = reference(*ref_ins, ref_mask, causal, None, p, seed)
    ref_grads = torch.autograd.grad(ref, ref_ins, dout.float().cpu())
    assert out.dtype == dtype and out.shape == (b, h, tq, d)
    assert_close(out.cpu(), ref, dtype, f"{impl} out")
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert_close(got.cpu(), want, dtype, f"{impl} {name}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_oracle_on_random_shapes(impl):
    runs, examples = IMPLS[impl]
    ok, why = runs()
    if not ok:
        pytest.skip(f"{impl} cannot run here: {why}")
    small = impl == "triton" and not torch.cuda.is_available()
    hi = 20 if small else 70

    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(1, 3), st.integers(1, 3), st.integers(1, hi), st.integers(1, hi), st.integers(1, 24),
           st.sampled_from([8, 16, 24] if small else [8, 16, 40, 64]), st.booleans(),
           st.sampled_from([None, "padding", "full"]), st.sampled_from([torch.float32, torch.bfloat16]),
           st.sampled_from([0.0, 0.0, 0.2]), st.integers(0, 2**16))
    def run(b, h, tq, tk, n, d, causal, mask_kind, dtype, p, seed):
        check_against_oracle(impl, b, h, tq, tk, n, d, causal, mask_kind, dtype, p, seed)

    run()


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["one-sample-slices", "whole-batch"])
def test_torch_two_branch_path_matches_oracle(chunk_bytes, monkeypatch):
    """The CPU path for long sequences (prefix and sequence attended apart, merged by log-sum-exp, the
    prefix branch a slice of the batch at a time), forced here at small sizes."""
    from peftmed.kernels.prefix_attention import reference as ref_module

    monkeypatch.setattr(ref_module, "CONCAT_MAX_KEYS", 0)
    monkeypatch.setattr(ref_module, "PREFIX_CHUNK_BYTES", chunk_bytes)

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.integers(1, 12),
           st.sampled_from([8, 40, 64]), st.booleans(), st.sampled_from([None, "padding", "full"]),
           st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
    def run(b, h, tq, tk, n, d, causal, mask_kind, dtype, seed):
        check_against_oracle("torch", b, h, tq, tk, n, d, causal, mask_kind, dtype, 0.0, seed)

    run()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matmul_path_without_flash(dtype, monkeypatch):
    """The matmul formulation (GPU without Triton, fp64, dropout) on its own, dropout off."""
    from peftmed.kernels.prefix_attention import reference as ref_module

    monkeypatch.setattr(ref_module, "_use_flash", lambda q, p: False)
    ins, mask, dout = make_inputs(2, 3, 9, 11, 5, 16, "padding", dtype, 3)
    ins = [t.requires_grad_() for t in ins]
    fns = {"forward": ref_module.forward, "backward": ref_module.backward}
    out = _PrefixAttentionFunction.apply(*ins, mask[:, None, None, :], True, 0.3, 0.0, 0, fns)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = reference(*ref_ins, mask[:, None, None, :], True, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(out, ins, dout), torch.autograd.grad(ref, ref_ins, dout.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_dropout_drops_the_same_elements_in_every_implementation():
    """The hashed dropout mask depends on the seed only: out differs from p=0, and the reference
    with the same seed reproduces it (what lets backward regenerate instead of store it)."""
    ins, mask, _ = make_inputs(2, 2, 6, 8, 4, 8, None, torch.float32, 0)
    _, fns = kernels.resolve("prefix_attention", "torch", "cpu", torch.float32, 8)
    dropped, _ = fns["forward"](*ins, None, False, None, 0.5, 1234)
    plain, _ = fns["forward"](*ins, None, False, None, 0.0, 0)
    assert (dropped - plain).abs().max() > 1e-2
    torch.testing.assert_close(dropped, reference(*ins, None, False, None, 0.5, 1234))


# ---- attend(): what the models call -----------------------------------------------------------------
@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("padding", False), ("full", True), (None, True)])
def test_attend_with_a_prefix_equals_the_concatenation(mask_kind, causal):
    ins, mask, dout = make_inputs(3, 4, 7, 10, 6, 16, mask_kind, torch.float32, 5)
    a = [t.clone().requires_grad_() for t in ins]
    r = [t.clone().requires_grad_() for t in ins]
    out = attend(a[0], a[1], a[2], prefix=(a[3], a[4]), attn_mask=mask, causal=causal, scale=0.2)
    ref = attend_reference(r[0], r[1], r[2], prefix=(r[3], r[4]), attn_mask=mask, causal=causal, scale=0.2)
    assert_close(out, ref, torch.float32, "attend out")
    for got, want in zip(torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, r, dout)):
        assert_close(got, want, torch.float32, "attend grad")


def test_attend_casts_the_prefix_and_uses_the_reference_for_a_per_sample_prefix():
    ins, _, _ = make_inputs(2, 2, 3, 4, 2, 8, None, torch.bfloat16, 1)
    q, k, v, pk, pv = ins
    out = attend(q, k, v, prefix=(pk.float(), pv.float()))  # an fp32 prefix with bf16 activations
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(q, k, v, pk, pv), torch.bfloat16, "cast prefix")
    per_sample = (pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1))
    assert_close(attend(q, k, v, prefix=per_sample), reference(q, k, v, pk, pv), torch.bfloat16, "(B, H, P, D)")


def test_empty_prefix_falls_through_to_plain_attention():
    ins, mask, _ = make_inputs(2, 2, 5, 6, 1, 8, "padding", torch.float32, 2)
    q, k, v, pk, pv = ins
    empty = (pk[:, :0], pv[:, :0])
    mask = mask | torch.eye(2, 6, dtype=torch.bool)  # every sample keeps a key: plain softmax is defined
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
    torch.testing.assert_close(prefix_attention(q, k, v, *empty, mask), expected)
    torch.testing.assert_close(attend(q, k, v, prefix=empty, attn_mask=mask), expected)


def test_saves_no_per_sample_prefix_copy_for_backward():
    """What autograd keeps alive between forward and backward: the reference keeps [prefix; keys] and
    [prefix; values] per sample; the op keeps q, k, v, the (H, P, D) prefix once, out and the lse."""
    b, h, tq, tk, n, d = 8, 4, 12, 12, 10, 16
    ins, mask, _ = make_inputs(b, h, tq, tk, n, d, "padding", torch.float32, 0)

    def saved_bytes(fn):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        leaves = [t.clone().requires_grad_() for t in ins]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*leaves)
        return sum(seen.values())

    prefix_copies = 2 * b * h * n * d * 4  # keys and values, fp32
    ref = saved_bytes(lambda q, k, v, pk, pv: attend_reference(q, k, v, prefix=(pk, pv), attn_mask=mask))
    op = saved_bytes(lambda q, k, v, pk, pv: attend(q, k, v, prefix=(pk, pv), attn_mask=mask))
    assert ref - op >= prefix_copies, (ref, op, prefix_copies)


def test_torch_compile_traces_the_custom_ops():
    ins, mask, dout = make_inputs(2, 2, 5, 6, 3, 8, "padding", torch.float32, 4)
    a = [t.clone().requires_grad_() for t in ins]

    def fn(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, mask, causal=True)

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*a)
    ref_ins = [t.clone().requires_grad_() for t in ins]
    ref = reference(*ref_ins, mask[:, None, None, :], True)
    assert_close(out, ref, torch.float32, "compiled out")
    for got, want in zip(torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, ref_ins, dout)):
        assert_close(got, want, torch.float32, "compiled grad")


# ---- bad input ------------------------------------------------------------------------------------
def test_prefix_with_other_heads_or_head_dim_is_refused_naming_both():
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(ShapeError, match=r"3 heads of dim 8.*4 heads of dim 8"):
        prefix_attention(q, q, q, torch.randn(3, 5, 8), torch.randn(3, 5, 8))
    with pytest.raises(ShapeError, match=r"4 heads of dim 16.*4 heads of dim 8"):
        prefix_attention(q, q, q, torch.randn(4, 5, 16), torch.randn(4, 5, 16))
    with pytest.raises(ShapeError, match=r"heads of dim 16"):
        attend(q, q, q, prefix=(torch.randn(4, 5, 16), torch.randn(4, 5, 16)))


def test_mask_that_does_not_broadcast_is_refused():
    q, pk = torch.randn(2, 4, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ShapeError, match=r"\(2, 1, 3, 7\).*\(2, 4, 3, 3\)"):
        prefix_attention(q, q, q, pk, pk, torch.ones(2, 1, 3, 7, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"\(3, 3\)"):
        prefix_attention(q, q, q, pk, pk, torch.ones(3, 3, dtype=torch.bool))  # 2-D is (B, Tk): B=3 is wrong
    with pytest.raises(ValueError, match="dropout probability"):
        prefix_attention(q, q, q, pk, pk, dropout_p=1.0)


def test_explicit_triton_without_gpu_or_interpreter_is_a_clear_error(fresh_dispatch, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton runs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(kernels.KernelUnavailableError, match="prefix_attention:triton"):
        prefix_attention(q, q, q, torch.randn(1, 2, 8), torch.randn(1, 2, 8), impl="triton")


# ---- CUDA -------------------------------------------------------------------------------------------
def test_cu_file_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    cu = CSRC / "prefix_attention" / "prefix_attention.cu"
    proc = subprocess.run([nvcc, "-c", "-arch=sm_90", "-O1", f"-I{CSRC}", str(cu), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_implementations_match_the_oracle(impl, dtype):
    for case in [(1, 1, 1, 1, 1, 8, False, None, 0.0), (2, 3, 35, 35, 10, 64, False, "padding", 0.1),
                 (3, 4, 70, 129, 33, 64, True, "full", 0.0), (2, 12, 10, 1024, 64, 64, True, "padding", 0.0)]:
        check_against_oracle(impl, *case[:7], case[7], dtype, case[8], 11)
