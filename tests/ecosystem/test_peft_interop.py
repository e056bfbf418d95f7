"""Adapters exported for huggingface/peft load with the real peft library and compute what peftmed
computes on the same transformers model (and peft adapters import back)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.errors import AdapterError  # noqa: E402
from peftmed.interop import export_to_peft, import_from_peft  # noqa: E402
from peftmed.testing import helpers as h  # noqa: E402

from cli_helpers import ok, peftmed as run, refused  # noqa: E402

peft = pytest.importorskip("peft")
BACKBONE = "hf-blip-vqa"

CASES = {
    "lora": "vision=lora(r=4,alpha=8) fusion=lora(r=2,alpha=4)",
    "lora-conv": "vision=lora(r=4,alpha=8,roles=patch) fusion=lora(r=2,alpha=4)",  # the patch-embedding Conv2d
    "ia3": "fusion=ia3",
    "layernorm": "vision=layernorm decoder=layernorm",
}


@pytest.fixture(scope="module")
def registry():
    reg = peftmed.build_registry()
    if BACKBONE not in reg.names("backbone"):
        pytest.skip(f"backbone {BACKBONE} is not registered")
    return reg


def _model(reg):
    return h.build_model(reg.backbone(BACKBONE), seed=0)


@pytest.mark.parametrize("method", list(CASES))
def test_exported_adapter_loads_in_peft_with_same_output(method, registry, tmp_path):
    pm = peftmed.apply(_model(registry), CASES[method], registry=registry)
    h.perturb_(pm.adapter_tensors(), seed=1)
    inputs = h.example_inputs(pm.base_model, registry.backbone(BACKBONE), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours = h.run(pm, inputs)
        base = h.run(_model(registry), inputs)
    pm.save_adapter(tmp_path / "mine")
    export_to_peft(tmp_path / "mine", tmp_path / "peft", registry=registry)

    wrapper = _model(registry)
    peft.PeftModel.from_pretrained(wrapper.model, str(tmp_path / "peft"))  # injects into wrapper.model
    wrapper.eval()
    with torch.no_grad():
        theirs = h.run(wrapper, inputs)
    assert not torch.allclose(ours, base)  # the comparison is not between two base models
    h.assert_close(theirs, ours, f"peft vs peftmed output ({method})")

    # and back: peft's folder imports as a peftmed adapter with the same tensors and output
    import_from_peft(tmp_path / "peft", tmp_path / "back", backbone=BACKBONE, registry=registry)
    back = peftmed.load_adapter(_model(registry), tmp_path / "back", registry=registry)
    with torch.no_grad():
        h.assert_close(h.run(back, inputs), ours, f"round trip through peft ({method})")


def test_adapter_trained_in_peft_imports(registry, tmp_path):
    wrapper = _model(registry)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn.qkv"], init_lora_weights=False)
    pmodel = peft.get_peft_model(wrapper.model, config)
    inputs = h.example_inputs(wrapper, registry.backbone(BACKBONE), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        theirs = h.run(wrapper, inputs)
    pmodel.save_pretrained(str(tmp_path / "peft"))
    import_from_peft(tmp_path / "peft", tmp_path / "mine", backbone=BACKBONE, registry=registry)
    ours = peftmed.load_adapter(_model(registry), tmp_path / "mine", registry=registry)
    with torch.no_grad():
        h.assert_close(h.run(ours, inputs), theirs, "peftmed vs peft output")


@pytest.mark.parametrize("recipe,reason", [("vision=bitfit", "bitfit"), ("vision=full", "full")])
def test_methods_peft_cannot_represent_are_refused(recipe, reason, registry, tmp_path):
    peftmed.apply(_model(registry), recipe, registry=registry).save_adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match=f"peft cannot represent method.*{reason}"):
        export_to_peft(tmp_path / "a", tmp_path / "out", registry=registry)
    assert not (tmp_path / "out").exists()


def test_model_peft_does_not_know_is_refused(tmp_path):
    reg = peftmed.build_registry()
    peftmed.apply(peftmed.build_backbone("toy-vlm"), "fusion=lora(r=2)", registry=reg).save_adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match="toy-vlm.*not a transformers model"):
        export_to_peft(tmp_path / "a", tmp_path / "out", registry=reg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("as_regex", [True, False])
def test_ia3_trained_in_peft_imports_with_regex_or_list_targets(registry, tmp_path, as_regex):
    """peft writes target_modules / feedforward_modules as a list or as one regular expression."""
    wrapper = _model(registry)
    if as_regex:
        targets = r"text_encoder\.encoder\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)"
        feedforward = r"text_encoder\.encoder\.layer\.\d+\.output\.dense"
    else:
        targets = ["key", "value", "output.dense"]  # peft matches list entries by their last dotted parts
        feedforward = ["output.dense"]
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=True)
    pmodel = peft.get_peft_model(wrapper.model, config)
    with torch.no_grad():
        for n, p in pmodel.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    inputs = h.example_inputs(wrapper, registry.backbone(BACKBONE), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        theirs = h.run(wrapper, inputs)
    pmodel.save_pretrained(str(tmp_path / "peft"))
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert isinstance(saved["feedforward_modules"], str if as_regex else list)
    import_from_peft(tmp_path / "peft", tmp_path / "mine", backbone=BACKBONE, registry=registry)
    ours = peftmed.load_adapter(_model(registry), tmp_path / "mine", registry=registry)
    with torch.no_grad():
        h.assert_close(h.run(ours, inputs), theirs, "peftmed vs peft output (IA3)")


class _RenamedLora:
    """A third-party method (here LoRA under another name and config class) that declares its peft form: export
    and the bench's peft baseline take it with no edit to peftmed."""

    @staticmethod
    def _method():
        from peftmed.methods.base import PeftForm
        from peftmed.methods.lora import Lora, LoraConfig

        class HalfConfig(LoraConfig):
            pass

        class HalfLora(Lora):
            name = "half-lora"
            config_class = HalfConfig
            peft = PeftForm("LORA", tensors=Lora.peft.tensors, trainable=Lora.peft.trainable,
                            config=Lora.peft.config, info=Lora.peft.info, options=Lora.peft.options)

        return HalfLora()

    @peftmed.hookimpl
    def register_methods(self, register):
        register(self._method())


def test_a_plugin_method_that_declares_its_peft_form_exports_and_imports(tmp_path):
    reg = peftmed.build_registry(extra_plugins=[_RenamedLora()])
    if BACKBONE not in reg.names("backbone"):
        pytest.skip(f"backbone {BACKBONE} is not registered")
    pm = peftmed.apply(_model(reg), "fusion=half-lora(r=2,alpha=4)", registry=reg)
    h.perturb_(pm.adapter_tensors(), seed=1)
    inputs = h.example_inputs(pm.base_model, reg.backbone(BACKBONE), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ours = h.run(pm, inputs)
    pm.save_adapter(tmp_path / "mine")
    export_to_peft(tmp_path / "mine", tmp_path / "peft", registry=reg)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    wrapper = _model(reg)
    peft.PeftModel.from_pretrained(wrapper.model, str(tmp_path / "peft"))
    wrapper.eval()
    with torch.no_grad():
        h.assert_close(h.run(wrapper, inputs), ours, "peft vs a plugin method's export")
    # and a method that declares none is refused by name, with what can be exported
    peftmed.apply(_model(reg), "fusion=bitfit", registry=reg).save_adapter(tmp_path / "b")
    with pytest.raises(AdapterError, match=r"peft cannot represent method\(s\) \['bitfit'\].*exportable: .*half-lora"):
        export_to_peft(tmp_path / "b", tmp_path / "out", registry=reg)


def test_a_peft_dora_adapter_is_not_imported_as_lora(tmp_path):
    """peft's DoRA is a LORA adapter with use_dora: without a method that declares that form it is refused by name
    (before, it went to LoRA and failed on the magnitude tensor, naming neither DoRA nor a remedy)."""
    reg = peftmed.build_registry(load_entrypoints=False)  # the built-ins only: no DoRA plugin
    wrapper = h.build_model(reg.backbone(BACKBONE), seed=0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn.qkv"], use_dora=True)
    peft.get_peft_model(wrapper.model, config).save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(AdapterError, match=r"LORA adapter with use_dora=True has no peftmed equivalent.*\(lora\)"):
        import_from_peft(tmp_path / "peft", tmp_path / "mine", backbone=BACKBONE, registry=reg)
    assert not (tmp_path / "mine").exists()


@pytest.mark.slow  # four CLI processes
def test_export_and_import_do_not_replace_an_adapter_already_in_out(registry, tmp_path):
    """`peftmed export` and `peftmed import` replaced an adapter already in OUT without a word. Now they refuse
    before any work, name --overwrite, and leave every file as it was; with --overwrite they replace their own two
    files and nothing else."""
    pm = peftmed.apply(_model(registry), CASES["lora"], registry=registry)
    pm.save_adapter(tmp_path / "mine")
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"theirs": true}')
    (out / "notes.txt").write_text("keep")
    refused(run("export", "--to", "peft", tmp_path / "mine", out), "already holds adapter_config.json", "--overwrite")
    assert (out / "adapter_config.json").read_text() == '{"theirs": true}' and sorted(p.name for p in out.iterdir()) \
        == ["adapter_config.json", "notes.txt"]
    ok(run("export", "--to", "peft", tmp_path / "mine", out, "--overwrite"))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "notes.txt").read_text() == "keep"

    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    refused(run("import", "--from", "peft", out, tmp_path / "mine", "--backbone", BACKBONE),
            "already holds adapter.json, adapter.safetensors", "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before
    ok(run("import", "--from", "peft", out, tmp_path / "mine", "--backbone", BACKBONE, "--overwrite"))
