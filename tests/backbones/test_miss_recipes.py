"""A recipe of each method family on miss-tiny: the exact parameters the recipe names train (and get
gradients), everything else stays frozen with no gradient, and the papers' rows read against MISS."""

import re

import pytest
import torch
from torch import nn

import peftmed


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model():
    torch.manual_seed(0)
    return peftmed.build_backbone("miss-tiny")


def base_params(m, pattern):
    """Base-model parameter names (BLIP layout) matching ``pattern``."""
    return {n for n, _ in m.named_parameters() if re.search(pattern, n)}


def _ln_names(m):
    return {f"{mn}.{pn}" for mn, mod in m.named_modules() if isinstance(mod, nn.LayerNorm)
            for pn, _ in mod.named_parameters()}


# recipe -> (expected trainable base parameters or None, regex every new adapter parameter must match or None)
RECIPES = {
    "fusion=lora(r=4)": (set(), r"text_encoder\.encoder\.layer\.\d+\.(attention|crossattention)\.self\."
                                r"(query|value)\.lora_[AB]"),
    "decoder=ia3": (set(), r"text_decoder\.bert\.encoder\.layer\.\d+\..*ia3"),
    "*=layernorm(fused=false)": (_ln_names, None),
    "*=layernorm": (_ln_names, None),  # through the fused layer_norm op
    "vision=ffn": (lambda m: base_params(m, r"^visual_encoder\.blocks\.\d+\.mlp\.fc[12]\."), None),
    "fusion=attention": (lambda m: base_params(
        m, r"^text_encoder\.encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.dense)\."), None),
    "decoder=bitfit": (lambda m: base_params(m, r"^text_decoder\..*\.bias$"), None),
    "vision=full": (lambda m: base_params(m, r"^visual_encoder\."), None),
    "decoder=prefix(n=4)": (set(), r"prefix|prompt|embedding|mlp"),
    "fusion=ptuning-v2(n=4)": (set(), r"prefix|prompt|prompts"),
}


def _strip(name: str) -> str:
    name = name.removeprefix("base_model.")
    return name.replace(".base_layer", "")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_family_trains_exactly_what_the_recipe_names(recipe):
    m = model()
    expected_base, adapter_pattern = RECIPES[recipe]
    expected_base = expected_base(m) if callable(expected_base) else expected_base
    base_names = {n for n, _ in m.named_parameters()}
    pm = peftmed.apply(m, recipe)
    batch = m.example_batch(4)
    loss = m.compute_loss(batch)
    loss.backward()
    trainable, new, moved = set(), set(), 0.0
    for name, p in pm.named_parameters():
        plain = _strip(name)
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"  # (LoRA's A is 0 at init: B = 0)
            moved += float(p.grad.abs().sum())
            (trainable if plain in base_names else new).add(plain)
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    assert trainable == expected_base
    if adapter_pattern is None:
        assert not new
    else:
        assert new and all(re.search(adapter_pattern, n) for n in new), sorted(new)[:5]
    assert pm.num_trainable() > 0 and moved > 0


def test_prefix_on_miss_is_never_inert():
    m = model().eval()
    batch = m.example_batch(2)
    with torch.no_grad():
        before = m.compute_loss(batch)
        pm = peftmed.apply(m, "vision=prefix(n=4) fusion=ptuning-v2(n=4) decoder=ptuning-v2(n=4)")
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
        after = m.compute_loss(batch)
    assert not torch.isclose(before, after)
    assert len(m.generate(batch, num_beams=3)) == 2  # prefixes broadcast over beams


def test_papers_rows_read_against_miss_components():
    m = model()
    pm = peftmed.apply(m, peftmed.Recipe.parse("F|LoRA|LoRA", components=["vision", "fusion", "decoder"]))
    report = pm.trainable_report()
    assert report.row == "F|LoRA|LoRA"
    assert {r.component for r in report.rows} == {"fusion", "decoder"}
    pm2 = peftmed.apply(model(), peftmed.Recipe.parse("T|T|LoRA", components=["vision", "fusion", "decoder"]))
    assert pm2.trainable_report().row == "T|T|LoRA"


# The MILE paper's trainable-parameter percentages of the 361,478,972-parameter MISS, counted as it counts
# them (trainable / (base + added)), each reproduced by the row's plain form and the default roles.
PAPER_ROWS = [
    ("fusion=lora(r=4) decoder=lora(r=4)", 0.163),  # F|LoRA|LoRA with r=4
    ("F|LoRA|LoRA", 0.325),
    ("T|T|LoRA", 61.919),
    ("F|IA3|IA3", 0.051),
    ("F|PTV2|PTV2", 0.102),
    ("F|F|Prefix", 3.926),
    ("F|Prefix|Prefix", 7.556),
    ("T|T|Prefix", 63.354),
]


@pytest.mark.parametrize("recipe, paper", PAPER_ROWS)
def test_the_papers_rows_on_miss_base_to_the_printed_digits(recipe, paper):
    model = peftmed.build_backbone("miss-base", device="meta")
    report = peftmed.apply(model, recipe, keep_base=False).trainable_report()
    assert report.total_base == 361_478_972
    assert round(report.percent_with_added, 3) == paper, report


def test_layernorm_tuning_is_about_0_0425_percent_of_miss_base():
    model = peftmed.build_backbone("miss-base", device="meta")
    report = peftmed.apply(model, "*=layernorm", keep_base=False).trainable_report()
    assert report.trainable == 153_600 and round(report.percent, 4) == 0.0425


def test_the_self_attention_only_variant_is_one_option_away():
    """roles=[attn.q,attn.v] gives LoRA on self-attention only (half the MILE count)."""
    model = peftmed.build_backbone("miss-base", device="meta")
    report = peftmed.apply(model, "fusion=lora(roles=[attn.q,attn.v]) decoder=lora(roles=[attn.q,attn.v])",
                           keep_base=False).trainable_report()
    assert report.trainable == 589_824 and round(report.percent_with_added, 3) == 0.163
