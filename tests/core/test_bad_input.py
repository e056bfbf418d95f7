"""Bad input gets a clear error naming the bad value and what exists, and loses nothing."""

import json
import warnings

import pytest
import torch

import peftmed
from peftmed import AdapterError, ConfigError, RecipeError, UnknownNameError


def toy(seed=0):
    torch.manual_seed(seed)
    m = peftmed.build_backbone("toy-vlm")
    return m, m.example_inputs()


def test_unknown_method_lists_known_and_suggests_closest():
    m, _ = toy()
    with pytest.raises(UnknownNameError) as e:
        peftmed.apply(m, "fusion=lroa(r=8)")
    assert "did you mean 'lora'" in str(e.value) and "layernorm" in str(e.value)


def test_unknown_component_names_backbone_components():
    m, _ = toy()
    with pytest.raises(UnknownNameError, match="unknown component 'llm'.*decoder, fusion, vision"):
        peftmed.apply(m, "llm=lora")


def test_unknown_option_suggests_closest():
    m, _ = toy()
    with pytest.raises(UnknownNameError, match="unknown option 'rank' for method 'lora'.*Known options: alpha, bias"):
        peftmed.apply(m, "fusion=lora(rank=8)")
    with pytest.raises(UnknownNameError, match="alhpa.*did you mean 'alpha'"):
        peftmed.apply(m, "fusion=lora(alhpa=8)")


@pytest.mark.parametrize("opts, needle", [
    ("r=0", "r must be a positive integer, got r=0"),
    ("r=-2", "r=-2"),
    ("alpha=0", "alpha must be > 0"),
    ("dropout=1.0", r"dropout must be in \[0, 1\)"),
    ("dropout=-0.1", "dropout"),
    ("r=2.5", "expects an integer"),
    ("init=xavier", "init must be one of"),
])
def test_lora_options_out_of_range(opts, needle):
    m, _ = toy()
    with pytest.raises(ConfigError, match=needle):
        peftmed.apply(m, f"fusion=lora({opts})")


def test_recipe_matching_no_module_names_roles_and_component():
    m, _ = toy()
    with pytest.raises(RecipeError, match=r"component 'fusion'.*matches no module.*roles \['attn.qkv'\]"):
        peftmed.apply(m, "fusion=lora(roles=[attn.qkv])")


def test_failed_apply_leaves_model_untouched():
    m, x = toy()
    before = m(*x)
    names = [n for n, _ in m.named_modules()]
    with pytest.raises(RecipeError):
        peftmed.apply(m, "vision=lora(r=2) fusion=lora(roles=[attn.qkv])")
    with pytest.raises(UnknownNameError, match="unknown role 'atn.q'.*did you mean 'attn.q'"):
        peftmed.apply(m, "vision=lora(r=2) fusion=lora(roles=[atn.q])")
    assert [n for n, _ in m.named_modules()] == names
    torch.testing.assert_close(m(*x), before)


def test_second_recipe_needs_a_new_adapter_name():
    m, _ = toy()
    pm = peftmed.apply(m, "fusion=lora")
    with pytest.raises(RecipeError, match="already has adapter 'default'.*adapter_name="):
        peftmed.apply(pm, "decoder=ia3")
    pm2 = peftmed.apply(pm, "decoder=ia3", adapter_name="second")
    assert pm2 is pm and pm.active_adapter == "second"


def test_adapter_for_another_backbone_is_refused(tmp_path):
    m, _ = toy()
    pm = peftmed.apply(m, "fusion=lora")
    pm.save_adapter(tmp_path / "a")
    other = peftmed.Backbone(name="other-model", components={"vision": "vision", "fusion": "fusion", "decoder": "decoder"},
                             roles={"attn.q": r"\.attn\.q$", "attn.v": r"\.attn\.v$"})
    m2, _ = toy()
    with pytest.raises(AdapterError, match="saved for backbone 'toy-vlm'; this model is backbone 'other-model'"):
        peftmed.load_adapter(m2, tmp_path / "a", backbone=other)


def test_tensor_shape_mismatch_names_the_tensor_and_rolls_back(tmp_path):
    m, x = toy()
    pm = peftmed.apply(m, "fusion=lora(r=4)")
    pm.save_adapter(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    # a model whose q/v are another size: the same recipe gives other shapes
    m2 = peftmed.get_backbone("toy-vlm").build(dim=48, heads=4)
    x2 = m2.example_inputs()
    before = m2(*x2)
    with pytest.raises(AdapterError, match=r"fusion\.blocks\.0\.attn\.q\.lora_A.*\(4, 32\).*\(4, 48\)"):
        peftmed.load_adapter(m2, tmp_path / "a")
    assert not any(isinstance(mod, peftmed.AdapterLayer) for mod in m2.modules())
    torch.testing.assert_close(m2(*x2), before)
    assert manifest["tensors"]["fusion.blocks.0.attn.q.lora_A"]["shape"] == [4, 32]


def test_truncated_or_corrupt_safetensors(tmp_path):
    m, _ = toy()
    pm = peftmed.apply(m, "fusion=lora(r=4)")
    pm.save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="do not match the digest"):  # the manifest's SHA-256 sees it first
        peftmed.load_adapter(toy()[0], tmp_path / "a")
    mpath = tmp_path / "a" / "adapter.json"  # an adapter without a digest (written by an older peftmed)
    mpath.write_text(json.dumps({k: v for k, v in json.loads(mpath.read_text()).items() if k != "weights_sha256"}))
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        peftmed.load_adapter(toy()[0], tmp_path / "a")
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        peftmed.load_adapter(toy()[0], tmp_path / "a")


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        peftmed.load_adapter(toy()[0], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter.json is missing"):
        peftmed.load_adapter(toy()[0], tmp_path / "empty")
    (tmp_path / "empty" / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        peftmed.load_adapter(toy()[0], tmp_path / "empty")


def test_manifest_with_keys_of_a_newer_version_loads_with_one_warning(tmp_path):
    """Unknown keys of the same format load with one warning (a newer format is refused: test_small_faults)."""
    m, x = toy()
    pm = peftmed.apply(m, "fusion=lora(r=4)")
    with torch.no_grad():
        pm.adapter_tensors()["fusion.blocks.0.attn.q.lora_B"].fill_(0.1)
    out = pm(*x)
    pm.save_adapter(tmp_path / "a")
    mpath = tmp_path / "a" / "adapter.json"
    manifest = json.loads(mpath.read_text())
    manifest["future_key"] = {"x": 1}
    manifest["methods"]["fusion"][0]["config"]["future_option"] = 3
    mpath.write_text(json.dumps(manifest))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm2 = peftmed.load_adapter(toy()[0], tmp_path / "a")
    text = " ".join(str(w.message) for w in caught)
    assert "future_key" in text and "future_option" in text
    assert sum("future_key" in str(w.message) for w in caught) == 1  # once, though the manifest is read twice
    torch.testing.assert_close(pm2(*x), out)


def test_unexpected_tensor_in_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    m, _ = toy()
    pm = peftmed.apply(m, "fusion=lora(r=4)")
    pm.save_adapter(tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    t["fusion.bogus.weight"] = torch.zeros(2)
    save_file(t, str(tmp_path / "a" / "adapter.safetensors"))
    mpath = tmp_path / "a" / "adapter.json"
    manifest = json.loads(mpath.read_text())
    manifest["tensors"]["fusion.bogus.weight"] = {"shape": [2], "dtype": "float32"}
    del manifest["weights_sha256"]  # as an adapter without a digest: the tensor check itself must name it
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match="unexpected tensors.*fusion.bogus.weight"):
        peftmed.load_adapter(toy()[0], tmp_path / "a")


def test_lora_on_a_non_linear_module_names_it():
    m, _ = toy()
    with pytest.raises(RecipeError, match=r"cannot wrap 'vision\.blocks\.0\.norm1'.*got LayerNorm"):
        peftmed.apply(m, "vision=lora(roles=[norm])")


def test_wildcard_skips_components_without_matches_but_named_ones_must_match():
    class TwoPart(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.proj = torch.nn.Linear(4, 4)  # no norm here

        def forward(self, x):
            return self.proj(self.enc(x))

    bb = peftmed.Backbone(name="two-part", components={"vision": "enc", "projector": "proj"})
    pm = peftmed.apply(TwoPart(), "*=layernorm", backbone=bb)
    assert [r.component for r in pm.trainable_report().rows] == ["vision"]
    assert "projector" in pm.adapters["default"].skipped[0]
    with pytest.raises(peftmed.NoMatchError, match="component 'projector'"):
        peftmed.apply(TwoPart(), "projector=layernorm", backbone=bb)
    with pytest.raises(peftmed.NoMatchError, match="matches nothing"):
        peftmed.apply(TwoPart(), "*=ffn", backbone=bb)


def test_component_spanning_several_modules():
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body(x))

    bb = peftmed.Backbone(name="lm", components={"llm": ("body", "head")})
    pm = peftmed.apply(LM(), "llm=full", backbone=bb)
    assert pm.trainable_report().trainable == 4 * 4 + 4 + 4 * 3 + 3
    assert pm.trainable_report().component_totals["llm"] == 35
