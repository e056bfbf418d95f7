"""LoRA on a Conv2d (the ``patch`` role: a ViT's patch embedding): identity at init, exact merge and unmerge,
gradients to both factors; what it cannot wrap is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftmed
from peftmed.errors import RecipeError
from peftmed.methods.lora import LoraConfig, LoraConv2d


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


@pytest.mark.parametrize("backbone,path", [("miss-tiny", "visual_encoder.patch_embed.proj"),
                                           ("hf-llava", "model.model.vision_tower.embeddings.patch_embedding"),
                                           ("hf-blip-vqa", "model.vision_model.embeddings.patch_embedding")])
def test_patch_role_wraps_the_convolution_and_merges_exactly(registry, backbone, path):
    bb = registry.backbone(backbone)
    model = bb.build()
    conv = model.get_submodule(path)
    images = torch.randn(2, conv.in_channels, 32, 32)
    with torch.no_grad():
        before = conv(images)
    pm = peftmed.apply(model, "vision=lora(r=3,alpha=6,roles=patch)", backbone=bb, registry=registry)
    layer = model.get_submodule(path)
    assert isinstance(layer, LoraConv2d)
    assert tuple(layer.lora_A["default"].shape) == (3, conv.in_channels, *conv.kernel_size)
    assert tuple(layer.lora_B["default"].shape) == (conv.out_channels, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(images), before)  # B = 0: the base model's output
        layer.lora_B["default"].normal_(std=0.1)
        adapted = layer(images)
    assert not torch.allclose(adapted, before)
    weight = conv.weight.detach().clone()
    pm.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(images), adapted, rtol=1e-5, atol=1e-5)
    pm.unmerge()
    torch.testing.assert_close(conv.weight, weight, rtol=0, atol=1e-6)
    layer(images).square().mean().backward()
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad.abs().sum() > 0


def test_what_it_cannot_wrap_is_refused():
    with pytest.raises(RecipeError, match="groups=4"):
        LoraConv2d(nn.Conv2d(8, 8, 3, groups=4))
    layer = LoraConv2d(nn.Conv2d(3, 4, 2))
    with pytest.raises(RecipeError, match="r=16 exceeds"):
        layer.add_adapter("a", LoraConfig(r=16), "patch")
