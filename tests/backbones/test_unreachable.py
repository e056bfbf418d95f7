"""Parameters that cannot learn: a backbone declares the parts of its model whose outputs never reach the loss
(``Backbone.unused``), methods skip them, and the trainable report counts what was skipped. Checked against a
real backward pass on every tiny built-in backbone: exactly the declared parameters get no gradient."""

import pytest
import torch

import peftmed
from peftmed.testing import helpers as h


def _reached(backbone_name):
    """Parameter name -> whether one backward pass of the model's example inputs gives it a gradient."""
    registry = peftmed.default_registry()
    backbone = registry.backbone(backbone_name)
    model = h.build_model(backbone)
    for p in model.parameters():
        p.requires_grad_(True)
    out = h.run(model, h.example_inputs(model, backbone, dtype=torch.float32, device="cpu"))
    out.float().sum().backward()
    return backbone, model, {n: p.grad is not None for n, p in model.named_parameters()}


def _task_backbones():
    """Tiny backbones that serve VQA or report generation (their example inputs run the loss path of the task);
    feature extractors (hf-encoder...) or a classifier with two heads (medclip: prompts or a linear probe) have
    no single loss path, so what reaches it depends on the user's choice."""
    registry = peftmed.default_registry()
    return [n for n in h.tiny_backbones(registry) if {"vqa", "report"} & set(registry.backbone(n).tasks)]


@pytest.mark.parametrize("name", _task_backbones())
def test_exactly_the_declared_parameters_get_no_gradient(name):
    backbone, model, reached = _reached(name)
    declared = tuple(backbone.unused(model)) if backbone.unused is not None else ()
    under = {n for n in reached if any(n.startswith(u + ".") for u in declared)}
    assert {n for n, r in reached.items() if not r} == under, name
    if name == "hf-llava":  # features from the second-to-last layer: the last one and the final norm feed nothing
        assert declared == ("model.model.vision_tower.encoder.layers.1", "model.model.vision_tower.post_layernorm")


def test_methods_skip_what_cannot_learn_and_the_report_says_so():
    model = peftmed.build_backbone("hf-llava")
    pm = peftmed.apply(model, "vision=lora(r=2) llm=lora(r=2)")
    names = set(pm.adapter_tensors())
    assert names and not any("encoder.layers.1." in n for n in names if "vision_tower" in n)
    row = next(r for r in pm.trainable_report().rows if r.component == "vision")
    layer = pm.base_model.get_submodule("model.model.vision_tower.encoder.layers.1")
    assert row.skipped == sum(p.numel() for n, p in layer.named_parameters()
                              if any(n.startswith(f"self_attn.{q}_proj.") for q in "qv"))  # LoRA's default roles
    assert row.skipped_names == ["model.model.vision_tower.encoder.layers.1"]
    assert "cannot learn: model.model.vision_tower.encoder.layers.1" in str(pm.trainable_report())
    full = peftmed.apply(peftmed.build_backbone("hf-llava"), "vision=full")
    trained = full.adapter_tensors()
    # every tensor the recipe trains receives a gradient in a real step: none is counted that cannot learn
    batch = full.base_model.example_inputs()[0]
    full.base_model.compute_loss(batch).backward()
    assert all(p.grad is not None for p in trained.values())
    skipped = next(r for r in full.trainable_report().rows if r.component == "vision").skipped
    vision = full.base_counts["vision"]
    assert full.trainable_report().trainable + skipped == vision
