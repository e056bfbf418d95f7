"""LoRA and LayerNorm-tuning train miss-tiny to the same losses with kernel=torch and with the fast
implementation (auto: the C++ kernels here), dropout included (every implementation regenerates the
same seeded mask)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftmed
from peftmed.kernels import FusedLayerNorm

from kernels_testlib import TOLERANCES


def _losses(base_model, batch, kernel: str, steps: int = 6) -> list[float]:
    model = copy.deepcopy(base_model)
    torch.manual_seed(0)  # the same dropout seeds in both runs
    recipe = (f"vision=lora(r=4,alpha=8,dropout=0.1,kernel={kernel}) fusion=layernorm(kernel={kernel}) "
              f"decoder=lora(r=4,alpha=8,kernel={kernel})")
    pm = peftmed.apply(model, recipe)
    fused = [m for m in model.modules() if isinstance(m, FusedLayerNorm)]
    assert fused and all(m.impl == kernel for m in fused)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_and_layernorm_tuning_losses_match_torch_reference(cpp_built, fresh_dispatch):
    model = peftmed.build_backbone("miss-tiny")
    batch = model.example_batch(2, seed=0)
    want = _losses(model, batch, "torch")
    got = _losses(model, batch, "auto")
    assert peftmed.kernels.resolve("lora_linear", "auto", "cpu", torch.float32, 4)[0].name == "cpp"
    rtol, atol = TOLERANCES[torch.float32]
    assert want[-1] < want[0]  # it trains
    assert got == pytest.approx(want, rel=rtol * 10, abs=atol * 10)  # 6 optimiser steps compound rounding
