"""On a GPU: the compiled kernels (Triton compiled, not interpreted; the CUDA extensions built) at the target
shapes, bf16 / fp16 / fp32, against the fp32 reference computed on the same device, with the per-dtype
tolerance table (kernels_testlib). Skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from kernels_testlib import assert_close

from peftmed import kernels
from peftmed.kernels.layer_norm.op import _LayerNormFunction
from peftmed.kernels.lora_linear import reference as lora_reference
from peftmed.kernels.lora_linear.op import _LoraLinearFunction
from peftmed.kernels.prefix_attention.op import _PrefixAttentionFunction
from peftmed.kernels.prefix_attention.reference import reference as prefix_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IMPLS = ["triton", "triton_persistent", "cuda"]  # triton_persistent: asked for by name (auto does not pick it yet)


def _resolve(op, impl, dtype, size):
    from peftmed.kernels.registry import KernelUnavailableError

    try:
        return kernels.resolve(op, impl, "cuda", dtype, size)[1]
    except KernelUnavailableError as e:  # refused by the dispatcher (Triton at fp32 and head dim 128), or a CUDA
        pytest.skip(f"{impl} {op} is not available here: {e}")  # extension that cannot build: the reason shown
    except Exception as e:
        if impl == "triton":  # Triton always imports on a GPU machine: anything else is a defect
            raise
        pytest.skip(f"the CUDA {op} extension is not available here: {e}")


def test_triton_runs_compiled_on_a_gpu():
    assert os.environ.get("TRITON_INTERPRET") != "1", "the GPU tests must run compiled Triton kernels"
    import triton.runtime.interpreter as interp

    from peftmed.kernels.lora_linear import triton_impl

    assert not isinstance(triton_impl._gemm_lora_kernel, interp.InterpretedFunction)


def _grads(y, tensors, dy):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = dict(zip(map(id, wanted), torch.autograd.grad(y, wanted, dy)))
    return [got.get(id(t)) if t is not None else None for t in tensors]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_at_the_target_shape(impl, dtype, p):
    t, d_in, d_out, r = 8192, 4096, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g, device="cuda") * std).to(dtype)
    x, w, b = mk(t, d_in), mk(d_out, d_in, std=d_in ** -0.5), mk(d_out)
    a, bb = mk(r, d_in, std=d_in ** -0.5), mk(d_out, r, std=r ** -0.5)
    ins = [x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_()]
    fns = _resolve("lora_linear", impl, dtype, r)
    y = _LoraLinearFunction.apply(*ins, 0.75, p, 7, fns)
    dy = mk(t, d_out)
    grads = _grads(y, ins, dy)
    ref_in = [u.detach().float().requires_grad_(u.requires_grad) for u in ins]
    y_ref = lora_reference.reference(*ref_in, 0.75, p, 7)
    ref_grads = _grads(y_ref, ref_in, dy.float())
    assert_close(y, y_ref, dtype, f"{impl} y")
    for name, got, want in zip(("dx", "dW", "dbias", "dA", "dB"), grads, ref_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_close(got, want, dtype, f"{impl} {name}")


def test_cuda_lora_dropout_dx_past_65535_rows():
    """gridDim.y is at most 65,535: 70,000 rows used to be an invalid launch."""
    rows, d, r = 70_000, 64, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, d, generator=g, device="cuda").requires_grad_()
    w = torch.randn(d, d, generator=g, device="cuda") / 8
    a = (torch.randn(r, d, generator=g, device="cuda") / 8).requires_grad_()
    bb = (torch.randn(d, r, generator=g, device="cuda") / 3).requires_grad_()
    fns = _resolve("lora_linear", "cuda", torch.float32, r)
    y = _LoraLinearFunction.apply(x, w, None, a, bb, 1.0, 0.25, 3, fns)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, [x], dy)
    ref_in = [u.detach().requires_grad_(u.requires_grad) for u in (x, w, None, a, bb) if u is not None]
    y_ref = lora_reference.reference(ref_in[0], ref_in[1], None, ref_in[2], ref_in[3], 1.0, 0.25, 3)
    dx_ref, = torch.autograd.grad(y_ref, [ref_in[0]], dy)
    assert_close(dx, dx_ref, torch.float32, "cuda dx at 70,000 rows")
    assert dx[65_535:].abs().sum() > 0  # the rows past the old grid limit were written


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [768, 1024])
def test_layer_norm_at_the_target_shape(impl, dtype, n):
    rows = 32768
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(rows, n, generator=g, device="cuda") * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(n, generator=g, device="cuda")).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(rows, n, generator=g, device="cuda").to(dtype)
    fns = _resolve("layer_norm", impl, dtype, n)
    y = _LayerNormFunction.apply(x, w, b, 1e-5, fns)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    ref = [u.detach().float().requires_grad_() for u in (x, w, b)]
    y_ref = F.layer_norm(ref[0], (n,), ref[1], ref[2], 1e-5)
    ref_grads = torch.autograd.grad(y_ref, ref, dy.float())
    assert_close(y, y_ref, dtype, f"{impl} y")
    for name, got, want in zip(("dx", "dgamma", "dbeta"), grads, ref_grads):
        assert_close(got, want, dtype, f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,n,t,causal,mask_kind,p", [
    (64, 10, 35, False, "padding", 0.0),
    (64, 64, 1024, True, "padding", 0.1),
    (128, 32, 256, False, "full", 0.0),
    (128, 64, 1024, True, None, 0.0),
])
def test_prefix_attention_at_the_target_shapes(impl, dtype, d, n, t, causal, mask_kind, p):
    b, h = 32, 12
    g = torch.Generator(device="cuda").manual_seed(d + n + t)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()
    ins = [mk(b, h, t, d), mk(b, h, t, d), mk(b, h, t, d), mk(h, n, d), mk(h, n, d)]
    mask = None
    if mask_kind == "padding":
        mask = (torch.rand(b, t, generator=g, device="cuda") > 0.3)[:, None, None, :]
    elif mask_kind == "full":
        mask = torch.rand(b, 1, t, t, generator=g, device="cuda") > 0.5
    fns = _resolve("prefix_attention", impl, dtype, d)
    out = _PrefixAttentionFunction.apply(*ins, mask, causal, None, p, 5, fns)
    dout = torch.randn(b, h, t, d, generator=g, device="cuda").to(dtype)
    grads = torch.autograd.grad(out, ins, dout)
    ref_ins = [u.detach().float().requires_grad_() for u in ins]
    ref = prefix_reference(*ref_ins, mask, causal, None, p, 5)
    ref_grads = torch.autograd.grad(ref, ref_ins, dout.float())
    assert_close(out, ref, dtype, f"{impl} out")
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert_close(got, want, dtype, f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_with_a_weight_of_more_than_2_31_elements(impl):
    """A 152k-vocabulary head at width 16k: 2.5e9 weight elements, so the weight's offsets need 64 bits (int32
    offsets read the wrong rows). Checked on the rows past the int32 limit against the fp32 reference."""
    t, d_in, d_out, r, dtype = 16, 16384, 152064, 8, torch.bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip("needs 8 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, d_in, generator=g, device="cuda").to(dtype)
    w = (torch.randn(d_out, d_in, generator=g, device="cuda") * d_in ** -0.5).to(dtype)
    a = (torch.randn(r, d_in, generator=g, device="cuda") * d_in ** -0.5).to(dtype)
    bb = (torch.randn(d_out, r, generator=g, device="cuda") * r ** -0.5).to(dtype)
    fns = _resolve("lora_linear", impl, dtype, r)
    y = _LoraLinearFunction.apply(x, w, None, a, bb, 2.0, 0.0, 0, fns)
    tail = slice(2**31 // d_in - 4, d_out)  # the output columns whose weight rows start past element 2**31
    ref = (x.float() @ w[tail].float().T) + 2.0 * (x.float() @ a.float().T) @ bb[tail].float().T
    assert_close(y[:, tail].float(), ref, dtype, "lora_linear past 2**31 weight elements")
