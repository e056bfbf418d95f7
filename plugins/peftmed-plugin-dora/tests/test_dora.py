"""DoRA against the conformance kit, plus what is specific to it."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.testing import conformance_tests, fresh_registry  # noqa: E402

TestDoraConformance = conformance_tests(method_name="dora", options={"r": 4, "alpha": 8})


def test_dora_is_registered_by_its_distribution():
    reg = fresh_registry()
    owner = reg.owner("method", "dora")
    assert owner is not None and owner.distribution == "peftmed-plugin-dora"


def test_weight_is_magnitude_times_unit_direction():
    """After training, each row of the merged weight has the learned magnitude as its norm."""
    reg = fresh_registry()
    model = peftmed.build_backbone("toy-vlm")
    pm = peftmed.apply(model, "fusion=dora(r=2)", registry=reg)
    layer = next(m for m in pm.modules() if type(m).__name__ == "DoraLinear")
    with torch.no_grad():
        layer.lora_B["default"].normal_()
        layer.magnitude["default"].uniform_(0.5, 2.0)
    pm.merge()
    torch.testing.assert_close(layer.base_layer.weight.norm(dim=1), layer.magnitude["default"].detach())


@pytest.mark.parametrize("bad", ["r=0", "alpha=-1", "dropout=1.0"])
def test_bad_options_name_the_value(bad):
    reg = fresh_registry()
    with pytest.raises(peftmed.ConfigError, match=bad.split("=")[0]):
        peftmed.apply(peftmed.build_backbone("toy-vlm"), f"fusion=dora({bad})", registry=reg)


def test_dora_is_a_lora_variant_with_loras_options_and_kernel():
    """DoRA gets LoRA's options (rslora, init, kernel) through the variant hook, and its output is the formula
    (m / ||W + sBA||) (x W^T + s B A x) + b computed here with plain torch."""
    reg = fresh_registry()
    model = peftmed.build_backbone("toy-vlm")
    pm = peftmed.apply(model, "fusion=dora(r=4,alpha=8,rslora=true,init=gaussian,kernel=torch)", registry=reg)
    layer = next(m for m in pm.modules() if type(m).__name__ == "DoraLinear")
    cfg = layer.configs["default"]
    assert cfg.scaling == 8 / 2  # alpha / sqrt(r)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
        layer.magnitude["default"].uniform_(0.5, 2.0)
    x = torch.randn(3, layer.base_layer.in_features)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b, m = layer.lora_A["default"], layer.lora_B["default"], layer.magnitude["default"]
    delta = cfg.scaling * b @ a
    want = (m / (w + delta).norm(dim=1)) * (x @ w.t() + x @ delta.t()) + bias
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(peftmed.RecipeError, match="DoRA wraps nn.Linear"):
        type(layer)(torch.nn.Conv2d(3, 4, 2))


def test_dora_crosses_to_peft_and_back_with_the_same_output(tmp_path):
    """Exported, peft's own DoRA (LoRA with use_dora) loads it on the same transformers model and computes the same
    output; peft's DoRA folder imports back as DoRA (not as LoRA, which has no magnitude)."""
    peft = pytest.importorskip("peft")
    from peftmed.interop import export_to_peft, import_from_peft
    from peftmed.testing import helpers as h

    reg = fresh_registry()
    bb = reg.backbone("hf-blip-vqa")
    pm = peftmed.apply(h.build_model(bb, seed=0), "vision=dora(r=4,alpha=8) fusion=dora(r=4,alpha=8)", registry=reg)
    h.perturb_(pm.adapter_tensors(), seed=1)
    inputs = h.example_inputs(pm.base_model, bb, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours = h.run(pm, inputs)
        base = h.run(h.build_model(bb, seed=0), inputs)
    pm.save_adapter(tmp_path / "mine")
    export_to_peft(tmp_path / "mine", tmp_path / "peft", registry=reg)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True

    wrapper = h.build_model(bb, seed=0)
    peft.PeftModel.from_pretrained(wrapper.model, str(tmp_path / "peft"))
    wrapper.eval()
    with torch.no_grad():
        theirs = h.run(wrapper, inputs)
    assert not torch.allclose(ours, base)
    h.assert_close(theirs, ours, "peft's DoRA vs peftmed's")

    import_from_peft(tmp_path / "peft", tmp_path / "back", backbone="hf-blip-vqa", registry=reg)
    manifest = json.loads((tmp_path / "back" / "adapter.json").read_text())
    assert {m["method"] for ms in manifest["methods"].values() for m in ms} == {"dora"}
    back = peftmed.load_adapter(h.build_model(bb, seed=0), tmp_path / "back", registry=reg)
    with torch.no_grad():
        h.assert_close(h.run(back, inputs), ours, "round trip through peft (DoRA)")
