"""Gradient checkpointing per component still trains every adapter inside checkpointed blocks, with the
gradients of the run without it (LoRA dropout included), and really recomputes the blocks."""

from __future__ import annotations

import pytest
import torch

import peftmed
from peftmed.errors import ConfigError, UnknownNameError
from peftmed.memory import enable_checkpointing
from peftmed.memory.checkpointing import component_blocks, disable_checkpointing

CASES = {
    "miss-tiny": "vision=lora(r=4,dropout=0.1,roles=[attn.qkv,patch]) fusion=layernorm decoder=lora(r=4,dropout=0.1)",
    "hf-llava": "vision=lora(r=4,dropout=0.1) projector=full llm=lora(r=4,dropout=0.1)",
    "hf-blip-vqa": "vision=lora(r=4,dropout=0.1) fusion=prefix(n=4) decoder=lora(r=4)",
}


def _batch(model) -> dict:
    out = model.example_inputs(2)
    out = out[0] if isinstance(out, tuple) else out
    return out.get("batch", out)  # MISS: {"batch": ..., "return_logits": True} (forward's keyword arguments)


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _grads(registry, backbone: str, checkpoint) -> tuple[dict, float]:
    bb = registry.backbone(backbone)
    torch.manual_seed(0)
    model = bb.build()
    pm = peftmed.apply(model, CASES[backbone], backbone=bb, registry=registry)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero LoRA B: every factor gets a gradient
    if checkpoint:
        enable_checkpointing(pm, checkpoint)
    pm.train()
    batch = _batch(model)
    torch.manual_seed(1)  # the same dropout masks in both runs (and in the recomputation)
    loss, count = pm.loss_terms(batch) if hasattr(pm, "loss_terms") else (pm.compute_loss(batch), 1)
    loss.backward()
    return {k: p.grad for k, p in pm.adapter_tensors().items()}, float(loss.detach())


@pytest.mark.parametrize("backbone", list(CASES))
def test_every_adapter_gets_the_gradient_of_the_run_without_checkpointing(registry, backbone):
    plain, loss_plain = _grads(registry, backbone, None)
    ckpt, loss_ckpt = _grads(registry, backbone, "all")
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    reached = [k for k, g in plain.items() if g is not None]
    assert len(reached) >= 4
    for key in plain:
        if plain[key] is None:
            assert ckpt[key] is None, key
            continue
        assert ckpt[key] is not None, f"{key} got no gradient under checkpointing"
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_frozen_input_trap_is_real_with_the_reentrant_variant(registry):
    """What the non-reentrant choice avoids: reentrant checkpointing of a ViT whose input needs no gradient
    gives LoRA inside the blocks no gradient at all (silently)."""
    from torch.utils.checkpoint import checkpoint

    bb = registry.backbone("miss-tiny")
    model = bb.build()
    pm = peftmed.apply(model, "vision=lora(r=4) decoder=layernorm", backbone=bb, registry=registry)
    for _, block in component_blocks(pm, "vision"):
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=True, **k)
    pm.train()
    with pytest.warns(UserWarning, match="requires_grad"):
        pm.compute_loss(_batch(model)).backward()
    grads = {k: p.grad for k, p in pm.adapter_tensors().items()}
    assert all(g is not None for k, g in grads.items() if "text_decoder" in k)  # the run trains...
    assert all(g is None for k, g in grads.items() if "lora" in k)  # ...but not the LoRA in the ViT


def test_checkpointed_blocks_are_recomputed_and_only_while_training(registry):
    bb = registry.backbone("hf-llava")
    model = bb.build()
    pm = peftmed.apply(model, "llm=lora(r=4)", backbone=bb, registry=registry)
    assert enable_checkpointing(pm, "llm") == {"llm": 2}
    attn = model.model.model.language_model.layers[0].self_attn
    calls = []
    attn.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch(model)
    pm.train()
    pm.loss_terms(batch)[0].backward()
    assert len(calls) == 2  # forward + recomputation in the backward pass
    calls.clear()
    pm.eval()
    with torch.no_grad():
        pm.loss_terms(batch)
    assert len(calls) == 1
    disable_checkpointing(pm)
    calls.clear()
    pm.train()
    pm.loss_terms(batch)[0].backward()
    assert len(calls) == 1


def test_bad_components_are_named(registry):
    bb = registry.backbone("hf-llava")
    pm = peftmed.apply(bb.build(), "llm=lora(r=4)", backbone=bb, registry=registry)
    with pytest.raises(UnknownNameError, match="'visoin'.*vision"):
        enable_checkpointing(pm, "visoin,llm")
    with pytest.raises(ConfigError, match="'projector'.*no stack of layers"):
        enable_checkpointing(pm, "projector")
    assert enable_checkpointing(pm, "all") == {"vision": 2, "llm": 2}  # all: the components that have layers
