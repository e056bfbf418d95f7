"""--quantize nf4: the LLM's frozen linear layers in 4 bits (bitsandbytes), the rest untouched, LoRA
training on top; its adapter loads onto a full-precision base; merging into 4 bits is refused."""

from __future__ import annotations

import sys

import pytest
import torch

import peftmed
from peftmed.errors import ConfigError, PeftmedError
from peftmed.memory import quantize_nf4, set_base_dtype
from peftmed.methods.base import is_quantized

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _llava(registry, recipe="vision=lora(r=4) llm=lora(r=4,roles=[attn.q,attn.v,mlp.down])"):
    bb = registry.backbone("hf-llava")
    torch.manual_seed(0)
    model = bb.build()
    return model, peftmed.apply(model, recipe, backbone=bb, registry=registry)


def _batch(model):
    return model.example_inputs(2)[0]


def test_only_the_llms_frozen_linears_are_quantized(registry):
    model, pm = _llava(registry)
    report_before = pm.trainable_report().to_dict()
    done = quantize_nf4(pm)
    llm = model.model.model.language_model
    linears = [m for m in llm.modules() if isinstance(m, torch.nn.Linear)]
    assert done["layers"] == 14 and all(is_quantized(m) for m in linears)  # q,k,v,o,gate,up,down x 2 layers
    assert not any(is_quantized(m) for m in model.model.model.vision_tower.modules())
    assert not any(is_quantized(m) for m in model.model.model.multi_modal_projector.modules())
    assert not is_quantized(model.model.lm_head)
    assert all(p.dtype == torch.float32 for p in pm.adapter_tensors().values())
    # the report counts weights, not the bytes they are packed into
    assert pm.trainable_report().to_dict()["total"] == report_before["total"]


def test_lora_trains_on_the_4bit_base_and_loads_onto_a_full_precision_one(registry, tmp_path):
    model, pm = _llava(registry)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.add_(torch.randn_like(p) * 0.05)
    quantize_nf4(pm)
    set_base_dtype(pm, "bf16")
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = pm.loss_terms(_batch(model))
    loss.backward()
    llm = {k: p for k, p in pm.adapter_tensors().items() if "language_model" in k}
    assert llm and all(p.grad is not None and p.grad.abs().sum() > 0 for p in llm.values())
    pm.save_adapter(tmp_path / "adapter")

    fresh = registry.backbone("hf-llava").build().to(torch.bfloat16)  # the same base, bf16, not quantized
    back = peftmed.load_adapter(fresh, tmp_path / "adapter", registry=registry)
    for k, p in back.adapter_tensors().items():
        torch.testing.assert_close(p, pm.adapter_tensors()[k])
    assert not any(is_quantized(m) for m in back.modules())


def test_merging_into_4bit_weights_is_refused(registry):
    _, pm = _llava(registry, "llm=lora(r=4)")
    quantize_nf4(pm)
    with pytest.raises(PeftmedError, match="4-bit base.*quantized.*bf16 or fp32 base"):
        pm.merge()


def test_what_cannot_be_quantized_is_named(registry, monkeypatch):
    _, pm = _llava(registry, "llm=full")
    with pytest.raises(ConfigError, match="'llm' trains the weights.*cannot be trained"):
        quantize_nf4(pm)
    bb = registry.backbone("miss-tiny")
    miss = peftmed.apply(bb.build(), "decoder=lora(r=4)", backbone=bb, registry=registry)
    with pytest.raises(ConfigError, match="no 'llm' component.*--quantize-components"):
        quantize_nf4(miss)
    _, pm = _llava(registry, "llm=lora(r=4)")
    with pytest.raises(PeftmedError, match="unknown component 'vison'.*--quantize-components"):
        quantize_nf4(pm, components="vison")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        quantize_nf4(pm)
