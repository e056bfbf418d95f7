"""The persistent LoRA kernel (``peftmed/kernels/lora_linear/persistent.py``) against the autograd oracle, what it
sends to today's kernels, and the launch its schedule relies on. On this CPU it runs in Triton's interpreter (one
program walking every tile: the same code, producers before the tiles that wait for them); on a GPU the same tests
run on the device (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from peftmed.kernels.lora_linear.impls import impls
from peftmed.kernels.lora_linear.persistent import MAX_RANK as PERSISTENT_MAX_RANK
from peftmed.kernels.registry import KernelCall

from kernels_testlib import triton_runs_here
from test_lora_linear import check_against_oracle

IMPL = "triton_persistent"


@pytest.fixture
def products(monkeypatch):
    """The persistent launches made (each a (rows, cols, depth, dB accumulated) tuple)."""
    ok, why = triton_runs_here()
    if not ok:
        pytest.skip(why)
    from peftmed import kernels
    from peftmed.kernels.lora_linear import persistent

    made = []
    real = persistent._product

    def spy(x, w, w_kn, n, *args, **kwargs):
        made.append((x.shape[0], n, x.shape[1], kwargs.get("db") is not None))
        return real(x, w, w_kn, n, *args, **kwargs)

    # the module the dispatcher loaded the implementation from (the one imported here, unless an earlier test left
    # the registry holding another copy)
    _, fns = kernels.resolve("lora_linear", IMPL, "cpu", torch.bfloat16, 8)
    for namespace in {id(g): g for g in (vars(persistent), fns["forward"].__globals__)}.values():
        monkeypatch.setitem(namespace, "_product", spy)
    # the kernel keeps to today's under deterministic algorithms (its own test below): off here, whatever ran before
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    yield made
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_backward_match_the_oracle_over_producer_and_waiting_tiles(products, dtype):
    """130 rows (five row blocks of the interpreter's 32, the last of 2 rows) x 96 outputs (three column blocks: one
    producer, two tiles that wait for its L): y, dx, dA and dB equal the oracle's; the forward and the backward's
    dx (with gs and dB in the same pass) each ran as one persistent launch."""
    from peftmed.kernels.lora_linear import persistent

    assert persistent.fits(torch.empty(130, 64, dtype=dtype), 130, 96, 64, 8) is None
    check_against_oracle(IMPL, 130, 64, 96, 8, True, 0.0, dtype, 11)
    assert products == [(130, 96, 64, False), (130, 64, 96, True)]


def test_dropout_in_the_forward_and_the_largest_rank(products):
    """Dropout masks the X tiles of the down product only (y's base GEMM reads x whole); the backward's dx takes a
    masked LoRA term per element, which goes to today's kernels. Rank 64, the persistent kernel's largest."""
    check_against_oracle(IMPL, 70, 48, 40, 13, False, 0.25, torch.bfloat16, 5)
    assert products == [(70, 40, 48, False)]
    products.clear()
    check_against_oracle(IMPL, 33, 40, 72, PERSISTENT_MAX_RANK, True, 0.0, torch.bfloat16, 6)
    assert products == [(33, 72, 40, False), (33, 40, 72, True)]


@pytest.mark.parametrize("case, why", [
    ((9, 24, 40, 8, True, 0.0, torch.float32, 1), "float32"),
    ((9, 24, 20, 8, True, 0.0, torch.bfloat16, 2), "16-byte"),  # rows of 20 bf16 (40 bytes): no TMA descriptor
    ((9, 24, 40, PERSISTENT_MAX_RANK + 1, True, 0.0, torch.bfloat16, 3), "rank 65"),
])
def test_what_it_does_not_take_goes_to_todays_kernels_with_the_same_result(products, case, why):
    from peftmed.kernels.lora_linear import persistent

    t, d_in, d_out, r, _, _, dtype, _ = case
    assert why in persistent.fits(torch.empty(t, d_in, dtype=dtype), t, d_out, d_in, r)
    check_against_oracle(IMPL, *case)
    assert products == []


def test_deterministic_algorithms_keep_to_todays_kernels(products):
    """dB's atomics sum in no fixed order: asked for deterministic algorithms, nothing runs persistent."""
    from peftmed.kernels.lora_linear import persistent

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in persistent.fits(torch.empty(4, 16, dtype=torch.bfloat16), 4, 16, 16, 4)
        check_against_oracle(IMPL, 40, 32, 48, 4, True, 0.0, torch.bfloat16, 8)
    finally:
        torch.use_deterministic_algorithms(was)
    assert products == []


def test_auto_never_picks_it_until_a_gpu_has_measured_it():
    impl = next(k for k in impls() if k.name == IMPL)
    why = impl.refuses(KernelCall("cuda", torch.bfloat16, 16))
    assert why and "asked for by name" in why and "not yet measured on a GPU" in why
    assert impl.refuses(KernelCall("cuda", torch.bfloat16, 16, explicit=True)) is None
    assert "rank 129" in impl.refuses(KernelCall("cuda", torch.bfloat16, 129, explicit=True))


def test_a_lora_layer_asked_for_it_by_name_trains_on_it(products):
    """The method's ``kernel=`` option reaches it: a bf16 LoRA layer trained a few steps runs every forward and
    backward persistent, and its loss falls."""
    from peftmed.methods.lora import LoraConfig, LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96, dtype=torch.bfloat16).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=8, alpha=16, kernel=IMPL), "attn.q")
    layer.active_adapter = "default"
    # x takes a gradient, as inside a network (without dx to compute, the backward is today's dA/dB kernels)
    x, target = torch.randn(40, 64, dtype=torch.bfloat16).requires_grad_(), torch.randn(40, 96, dtype=torch.bfloat16)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        loss = (layer(x).float() - target.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert len(products) == 8 and all(p[:3] in ((40, 96, 64), (40, 64, 96)) for p in products), products
