"""hf-encoder (CLIP-style), hf-encoder-vision (ViT-style), hf-encoder-text (BERT-style): forward, roles,
recipes, folder round trip and a folder of the wrong family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.errors import PeftmedError, ShapeError  # noqa: E402

ENCODERS = ("hf-encoder", "hf-encoder-vision", "hf-encoder-text")
QUESTIONS = ["is there a pleural effusion?", "what organ is shown?"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def inputs(model):
    images = None
    if model.reads_images:
        s = model.image_size
        images = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"images": images, "texts": QUESTIONS if model.reads_text else None}


@pytest.mark.parametrize("name", ENCODERS)
def test_forward_gives_hidden_states_per_tower(name):
    model = peftmed.build_backbone(name).eval()
    bb = peftmed.get_backbone(name)
    out = model(**inputs(model))
    assert set(k for k in out if k != "text_mask") == set(bb.components)
    if "vision" in out:
        cfg = getattr(model.model.config, "vision_config", model.model.config)
        patches = (cfg.image_size // cfg.patch_size) ** 2
        assert out["vision"].shape == (2, patches + 1, cfg.hidden_size)  # + CLS
    if "text" in out:
        lengths = [len(model.tokenizer(q)["input_ids"]) for q in QUESTIONS]
        assert out["text"].shape[:2] == (2, max(lengths))
        assert out["text_mask"].sum(1).tolist() == lengths


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("recipe", ["*=lora(r=4)", "*=ia3", "*=layernorm", "*=attention", "*=ffn", "*=bitfit"])
def test_every_method_applies_and_trains(name, recipe):
    model = peftmed.build_backbone(name).eval()
    pm = peftmed.apply(model, recipe)
    out = pm(**inputs(model))
    sum(v.float().pow(2).mean() for k, v in out.items() if k != "text_mask").backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(trainable)
    report = pm.trainable_report()
    assert {r.component for r in report.rows} == set(peftmed.get_backbone(name).components)


@pytest.mark.parametrize("name", ENCODERS)
def test_every_declared_role_matches_a_module(name):
    bb = peftmed.get_backbone(name)
    model = peftmed.build_backbone(name)
    declared = set(bb.roles) | {r for t in bb.component_roles.values() for r in t}
    for role in declared:
        assert any(bb.match(model, c, role) for c in bb.components), f"{name}: role {role} matches nothing"


@pytest.mark.parametrize("name", ENCODERS)
def test_save_and_load_round_trip(name, tmp_path):
    model = peftmed.build_backbone(name).eval()
    model.save_pretrained(tmp_path / "enc")
    loaded = peftmed.get_backbone(name).from_pretrained(tmp_path / "enc").eval()
    x = inputs(model)
    a, b = model(**x), loaded(**x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_folder_of_another_family_names_the_right_backbone(tmp_path):
    peftmed.build_backbone("hf-encoder-vision").save_pretrained(tmp_path / "vit")
    with pytest.raises(PeftmedError, match="'hf-encoder-vision'"):
        peftmed.get_backbone("hf-encoder-text").from_pretrained(tmp_path / "vit")


def test_wrong_image_size_is_a_clear_error():
    model = peftmed.build_backbone("hf-encoder-vision")
    with pytest.raises(ShapeError, match="image_size"):
        model.encode_images(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
