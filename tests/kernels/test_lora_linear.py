"""Every lora_linear implementation against the autograd oracle: outputs and all five gradients,
over random awkward shapes (1 row, odd widths, widths not a multiple of a block), with and without
dropout, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftmed import kernels
from peftmed.kernels.dropout import keep_mask
from peftmed.kernels.lora_linear import reference
from peftmed.kernels.lora_linear.op import _LoraLinearFunction

from kernels_testlib import assert_close, cpp_runs_here, triton_runs_here

IMPLS = {  # name -> (can run here, hypothesis examples: the Triton interpreter costs ~1 s a case)
    "torch": (lambda: (True, ""), 25),
    "cpp": (cpp_runs_here, 25),
    "triton": (triton_runs_here, 5),
}


def _inputs(t, d_in, d_out, r, bias, dtype, seed, requires_w=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = mk(t, d_in).requires_grad_()
    w = mk(d_out, d_in).requires_grad_(requires_w)
    b = mk(d_out).requires_grad_(requires_w) if bias else None
    a = mk(r, d_in).requires_grad_()
    bb = mk(d_out, r).requires_grad_()
    return x, w, b, a, bb


def _grads(y, tensors, dy):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = dict(zip(map(id, wanted), torch.autograd.grad(y, wanted, dy)))
    return [got.get(id(t)) if t is not None else None for t in tensors]


def check_against_oracle(impl, t, d_in, d_out, r, bias, p, dtype, seed, base_trainable=False):
    device = "cuda" if (impl == "cuda" or impl.startswith("triton")) and torch.cuda.is_available() else "cpu"
    x, w, b, a, bb = _inputs(t, d_in, d_out, r, bias, dtype, seed, base_trainable)
    tensors = [x, w, b, a, bb]
    moved = [u.detach().to(device).requires_grad_(u.requires_grad) if u is not None else None for u in tensors]
    _, fns = kernels.resolve("lora_linear", impl, device, dtype, r)
    scaling, mask_seed = 0.75, seed + 1
    y = _LoraLinearFunction.apply(*moved, scaling, p, mask_seed, fns)
    dy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    grads = _grads(y, moved, dy.to(device))

    ref_in = [u.detach().float().requires_grad_(u.requires_grad) if u is not None else None for u in tensors]
    y_ref = reference.reference(*ref_in, scaling, p, mask_seed)
    ref_grads = _grads(y_ref, ref_in, dy.float())
    assert y.dtype == dtype and y.shape == (t, d_out)
    assert_close(y.cpu(), y_ref, dtype, f"{impl} y")
    for name, got, want in zip(("dx", "dW", "dbias", "dA", "dB"), grads, ref_grads):
        assert (got is None) == (want is None), f"{impl} {name}: computed={got is not None}, expected={want is not None}"
        if want is not None:
            assert_close(got.cpu(), want, dtype, f"{impl} {name}")


shapes = st.tuples(
    st.integers(1, 40),  # tokens (1 row included)
    st.integers(1, 70),  # in features (odd, not multiples of a block)
    st.integers(1, 70),  # out features
    st.integers(1, 20),  # rank
    st.booleans(),  # bias
    st.sampled_from([0.0, 0.25]),  # dropout
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.integers(0, 2**16),  # seed
)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_oracle_on_random_shapes(impl, request):
    runs, examples = IMPLS[impl]
    ok, why = runs()
    if not ok:
        pytest.skip(f"{impl} cannot run here: {why}")
    if impl == "cpp":
        request.getfixturevalue("cpp_built")

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(shapes)
    def run(case):
        check_against_oracle(impl, *case)

    run()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_trainable_base_gets_weight_and_bias_gradients(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    check_against_oracle(impl, 17, 33, 21, 4, True, 0.25, torch.float32, 3, base_trainable=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gs_and_db_in_one_pass_over_several_row_blocks(dtype):
    """130 rows: each program of the one-pass gs/dB kernel walks several row blocks and adds them into its own
    dB partial (the interpreter's tiles are 32 rows, 2 programs): dx, dA and dB equal the oracle's."""
    ok, why = triton_runs_here()
    if not ok:
        pytest.skip(why)
    check_against_oracle("triton", 130, 40, 70, 8, True, 0.25, dtype, 7)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_fp16(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    check_against_oracle(impl, 9, 24, 40, 8, True, 0.0, torch.float16, 5)


def test_dropout_mask_is_shared_seeded_and_has_the_right_rate(cpp_built):
    mask = keep_mask(1234, 300, 301, 0.1)
    assert torch.equal(cpp_built["lora_linear_cpu"].keep_mask(1234, 300, 301, 0.1), mask)
    assert not torch.equal(keep_mask(1235, 300, 301, 0.1), mask)
    n = mask.numel()
    drop_rate = 1 - mask.float().mean().item()
    assert abs(drop_rate - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5  # 5 standard deviations of a binomial
    assert not keep_mask(1, 4, 4, 0.0).logical_not().any()


def test_dropout_mask_hashed_in_row_chunks_is_the_same_mask(cpp_built, monkeypatch):
    from peftmed.kernels import dropout

    monkeypatch.setattr(dropout, "MASK_CHUNK_ELEMENTS", 1000)  # 3 rows of 301 per chunk, a short last one
    assert torch.equal(keep_mask(77, 301, 301, 0.3), cpp_built["lora_linear_cpu"].keep_mask(77, 301, 301, 0.3))


def test_public_api_3d_input_noncontiguous_and_reproducible_dropout():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 20).transpose(0, 1)  # (3, 6, 20), not contiguous
    w, b, a, bb = torch.randn(12, 20), torch.randn(12), torch.randn(4, 20), torch.randn(12, 4)
    y = kernels.lora_linear(x, w, b, a, bb, 0.5, impl="torch")
    want = reference.reference(x.reshape(-1, 20), w, b, a, bb, 0.5).view(3, 6, 12)
    torch.testing.assert_close(y, want)
    torch.manual_seed(7)
    y1 = kernels.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, training=True)
    torch.manual_seed(7)
    y2 = kernels.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, training=True)
    y3 = kernels.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, training=True)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # eval mode: no dropout whatever dropout_p says
    torch.testing.assert_close(kernels.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, training=False), want)


def test_shape_errors_name_both_shapes():
    from peftmed.errors import ShapeError

    x, w, a, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(ShapeError, match=r"\(4, 15\).*\(8, 16\)"):
        kernels.lora_linear(torch.randn(4, 15), w, None, a, b, 1.0)
    with pytest.raises(ShapeError, match=r"lora_b has shape \(8, 3\).*\(8, 16\).*\(2, 16\)"):
        kernels.lora_linear(x, w, None, a, torch.randn(8, 3), 1.0)
    with pytest.raises(ShapeError, match=r"bias has shape \(7,\)"):
        kernels.lora_linear(x, w, torch.randn(7), a, b, 1.0)
    with pytest.raises(kernels.KernelInputError, match="torch.float64"):
        kernels.lora_linear(x, w.double(), None, a, b, 1.0)
