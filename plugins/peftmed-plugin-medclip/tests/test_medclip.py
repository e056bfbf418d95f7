"""The medclip backbones against the conformance kit: the backbone suite, and methods on it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.testing import backbone_conformance_tests, conformance_tests, fresh_registry  # noqa: E402

TestMedClipTiny = backbone_conformance_tests("medclip-tiny")
# built-in methods on each component kind of this backbone (the kit picks the first that applies)
TestLoraOnMedClip = conformance_tests("lora", {"r": 2}, backbones=("medclip-tiny",))
TestLayerNormOnText = conformance_tests("layernorm", backbones=("medclip-tiny",), component="text")
TestPrefixOnVision = conformance_tests("ptuning-v2", {"num_virtual_tokens": 3}, backbones=("medclip-tiny",))


def test_zero_shot_logits_use_both_towers():
    model = peftmed.build_backbone("medclip-tiny")
    inputs = model.example_inputs()
    logits = model(**inputs)["logits"]
    assert logits.shape == (2, model.num_classes)
    other = dict(inputs, input_ids=(inputs["input_ids"] + 1) % model.vocab)
    assert not torch.allclose(model(**other)["logits"], logits)


def test_base_preset_parameter_count_on_meta():
    reg = fresh_registry()
    with torch.device("meta"):
        model = reg.backbone("medclip-base").build()
    pm = peftmed.apply(model, "vision=layernorm text=layernorm", registry=reg, keep_base=False)
    report = pm.trainable_report()
    assert report.total_base > 150_000_000  # two base-size towers
    assert 0 < report.percent < 0.1  # LayerNorm-tuning trains well under 0.1%


def test_recipe_on_unknown_component_names_the_components():
    with pytest.raises(peftmed.UnknownNameError, match="projector"):
        peftmed.apply(peftmed.build_backbone("medclip-tiny"), "fusion=lora", registry=fresh_registry())
