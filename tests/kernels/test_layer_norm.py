"""Every layer_norm implementation against torch's layer_norm under autograd: y, dx, dgamma, dbeta
over random awkward shapes, fp32 and bf16; and FusedLayerNorm as a drop-in for nn.LayerNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peftmed import kernels
from peftmed.kernels.layer_norm.op import _LayerNormFunction

from kernels_testlib import assert_close, cpp_runs_here, triton_runs_here

IMPLS = {"torch": (lambda: (True, ""), 25), "cpp": (cpp_runs_here, 25), "triton": (triton_runs_here, 6)}


def check_against_oracle(impl, rows, n, dtype, seed, need_x=True):
    device = "cuda" if impl in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    ins = [t.to(device).requires_grad_(need_x or i > 0) for i, t in enumerate((x, w, b))]
    _, fns = kernels.resolve("layer_norm", impl, device, dtype, n)
    y = _LayerNormFunction.apply(*ins, 1e-5, fns)
    grads = torch.autograd.grad(y, [t for t in ins if t.requires_grad], dy.to(device))
    ref = [t.float().requires_grad_(need_x or i > 0) for i, t in enumerate((x, w, b))]
    y_ref = F.layer_norm(ref[0], (n,), ref[1], ref[2], 1e-5)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref if t.requires_grad], dy.float())
    assert y.dtype == dtype
    assert_close(y.cpu(), y_ref, dtype, f"{impl} y")
    names = ("dx", "dgamma", "dbeta") if need_x else ("dgamma", "dbeta")
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got.cpu(), want, dtype, f"{impl} {name}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_oracle_on_random_shapes(impl, request):
    runs, examples = IMPLS[impl]
    ok, why = runs()
    if not ok:
        pytest.skip(f"{impl} cannot run here: {why}")
    if impl == "cpp":
        request.getfixturevalue("cpp_built")

    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(1, 70), st.integers(1, 300), st.sampled_from([torch.float32, torch.bfloat16]),
           st.integers(0, 2**16))
    def run(rows, n, dtype, seed):
        check_against_oracle(impl, rows, n, dtype, seed)

    run()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_frozen_input_fp16_and_many_rows(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    check_against_oracle(impl, 1000, 96, torch.float32, 1, need_x=False)  # rows >> chunks: stage 2 sums
    check_against_oracle(impl, 33, 130, torch.float16, 2)


def test_fused_layer_norm_is_a_drop_in_sharing_parameters():
    torch.manual_seed(0)
    ln = nn.LayerNorm(24, eps=1e-6)
    nn.init.normal_(ln.weight)
    fused = kernels.FusedLayerNorm.from_module(ln, impl="torch")
    assert fused.weight is ln.weight and fused.bias is ln.bias and fused.eps == 1e-6
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(fused(x), ln(x))
    assert "impl=torch" in repr(fused)
    fused(x).sum().backward()
    assert ln.weight.grad is not None  # the same Parameter objects were trained


def test_errors():
    from peftmed.errors import ShapeError

    with pytest.raises(ShapeError, match=r"weight has shape \(5,\) but x has shape \(2, 4\)"):
        kernels.layer_norm(torch.randn(2, 4), torch.ones(5), torch.zeros(4))
    with pytest.raises(kernels.KernelInputError, match="torch.float64"):
        kernels.layer_norm(torch.randn(2, 4), torch.ones(4, dtype=torch.float64), torch.zeros(4))
    x = torch.randn(8, 6).t()  # non-contiguous input is copied once and still correct
    torch.testing.assert_close(kernels.layer_norm(x, torch.ones(8), torch.zeros(8), impl="torch"),
                               F.layer_norm(x, (8,)))


def test_the_torch_fallback_runs_under_torch_autograd_in_fp32():
    """Eager fp32 calls through the torch implementation are torch's own layer_norm under torch's autograd (no
    Python backward node: half the cost of a call on narrow rows); bf16 keeps the implementation's fp32
    statistics through peftmed's autograd.Function. Both give the oracle's values and gradients."""
    import torch.nn.functional as F

    from peftmed.kernels.layer_norm.op import layer_norm

    def nodes(t):
        out, todo = set(), [t.grad_fn]
        while todo:
            n = todo.pop()
            if n is not None:
                out.add(type(n).__name__)
                todo += [f for f, _ in n.next_functions]
        return out

    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 32, generator=g).to(dtype).requires_grad_()
        w, b = (torch.randn(32, generator=g).to(dtype).requires_grad_() for _ in range(2))
        y = layer_norm(x, w, b, 1e-5, impl="torch")
        ours = "_LayerNormFunctionBackward" in nodes(y)
        assert ours == (dtype == torch.bfloat16), nodes(y)
        assert dtype == torch.bfloat16 or "NativeLayerNormBackward0" in nodes(y), nodes(y)
        y.float().square().sum().backward()
        got = (y.detach(), x.grad, w.grad, b.grad)
        x2, w2, b2 = (t.detach().float().requires_grad_() for t in (x, w, b))
        want = F.layer_norm(x2, (32,), w2, b2, 1e-5)
        want.square().sum().backward()
        tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, e in zip(got, (want.detach(), x2.grad, w2.grad, b2.grad)):
            torch.testing.assert_close(a.float(), e, **tol)
