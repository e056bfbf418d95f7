"""peftmed plan: weights by dtype and quantization counted exactly on the meta model; the whole estimate within
15% of a real training step's measured peak (a 34M-parameter MISS, checkpointing on and off, bf16 base);
the command's verdicts and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import peftmed
from peftmed.memory.plan import _static_rows
from peftmed.memory.plan import measure_training_step, plan_memory
from peftmed.memory.quantize import NF4_BYTES_PER_WEIGHT

MISS_34M = dict(size="base", vision_width=256, vision_heads=4, vision_layers=6, text_width=256, text_heads=4,
                text_layers=6, intermediate_size=1024, image_size=224)


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _meta(registry, backbone, recipe):
    bb = registry.backbone(backbone)
    with torch.device("meta"):
        model = bb.build()
    return peftmed.apply(model, recipe, backbone=bb, registry=registry, keep_base=False)


def test_weights_follow_the_dtype_rules_exactly(registry):
    pm = _meta(registry, "llava-med-7b", "vision=layernorm llm=lora(r=8)")
    params = {id(p): p for p in pm.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in pm.adapter_tensors().values())
    norms = sum(p.numel() for m in pm.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
                for p in m.parameters(recurse=False))
    fp32 = sum(r.weights for r in _static_rows(pm, None, "none", None))
    assert fp32 == 4 * total
    bf16 = sum(r.weights for r in _static_rows(pm, torch.bfloat16, "none", None))
    frozen_norms = norms - sum(p.numel() for k, p in pm.adapter_tensors().items() if "norm" in k)
    assert bf16 == 2 * (total - trainable - frozen_norms) + 4 * (trainable + frozen_norms)
    rows = {r.component: r for r in _static_rows(pm, torch.bfloat16, "nf4", None)}
    llm_linear = sum(m.weight.numel() for n, m in pm.base_model.named_modules()
                     if type(m) is torch.nn.Linear and "language_model" in n)
    assert rows["llm"].weights < 0.3 * sum(r.weights for r in _static_rows(pm, torch.bfloat16, "none", None)
                                            if r.component == "llm")
    assert rows["llm"].weights == pytest.approx(llm_linear * NF4_BYTES_PER_WEIGHT + 2 * 2 * 32064 * 4096
                                                + 4 * (rows["llm"].trainable) + 4 * 4096 * 65, rel=1e-4)
    assert rows["llm"].gradients == 4 * rows["llm"].trainable and rows["llm"].optimizer == 8 * rows["llm"].trainable


@pytest.mark.parametrize("settings", [{}, {"grad_checkpoint": "all"}, {"base_dtype": "bf16"}],
                         ids=["plain", "checkpointing", "bf16"])
def test_the_estimate_is_within_15_percent_of_a_real_step(settings):
    kw = dict(batch_size=4, seq_len=20, backbone_options=MISS_34M, **settings)
    plan = plan_memory("miss", "*=lora(r=8)", **kw)
    real = measure_training_step("miss", "*=lora(r=8)", **kw)
    assert 30e6 < real["weights"] / 4 < 40e6 or settings  # a 34M-parameter model (fp32 weights)
    assert plan.depths == {"vision_layers": 6, "text_layers": 6}  # extrapolated from depths 2 and 3
    assert abs(plan.total - real["total"]) <= 0.15 * real["total"], (plan.total, real["total"])
    assert abs(plan.activations - real["activations"]) <= 0.15 * real["activations"]


def test_checkpointing_and_bf16_lower_the_estimate():
    kw = dict(batch_size=4, seq_len=20, backbone_options=MISS_34M)
    plain = plan_memory("miss", "*=lora(r=8)", **kw)
    assert plan_memory("miss", "*=lora(r=8)", grad_checkpoint="all", **kw).activations < 0.8 * plain.activations
    assert plan_memory("miss", "*=lora(r=8)", base_dtype="bf16", **kw).weights < 0.55 * plain.weights


def _plan(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftmed", "plan", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_the_command_says_whether_it_fits(tmp_path):
    ok = _plan("--backbone", "miss-tiny", "--recipe", "*=lora(r=4)", "--batch-size", "2", "--gpu-gb", "2",
               "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["largest_batch"] > 100 and data["total"] > data["weights"] > 0
    small = _plan("--backbone", "blip-vqa-base", "--recipe", "*=lora(r=4)", "--gpu-gb", "0.5", "--reserve-gb", "0",
                  cwd=tmp_path)
    assert small.returncode == 1
    assert "does not fit: the weights alone take 1.35 GB of the 0.5 GB" in small.stdout
    assert "--base-dtype bf16: weights 0.6" in small.stdout


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
    (["--grad-checkpoint", "visoin"], "unknown component 'visoin'"),
    (["--quantize", "nf4"], "no 'llm' component"),
    (["--gpu-gb", "-3"], "--gpu-gb must be a positive number, got -3.0"),
])
def test_bad_input_is_named(tmp_path, args, message):
    r = _plan("--backbone", "miss-tiny", "--recipe", "*=lora(r=4)", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
