"""What a user must be able to trust about adapters and inputs: a damaged or foreign adapter is refused with
its reason, saving never deletes a user's file, options outside their range are refused before any work,
and predictions are matched by exactly one qid each."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftmed
from peftmed import AdapterError, ConfigError, RecipeError
from peftmed.metrics import vqa_scores


def trained(seed=0):
    torch.manual_seed(seed)
    model = peftmed.build_backbone("miss-tiny")
    pm = peftmed.apply(model, "fusion=lora(r=4,kernel=torch) decoder=layernorm")
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.add_(0.01)
    return pm


def fresh(seed=0, **options):
    torch.manual_seed(seed)
    return peftmed.build_backbone("miss-tiny", **options)


@pytest.fixture
def saved(tmp_path):
    pm = trained()
    path = pm.save_adapter(tmp_path / "adapter")
    return pm, path


# ---- integrity (defect 9) ---------------------------------------------------------------------------
def test_flipped_bytes_in_the_weights_are_detected_by_the_digest(saved):
    _, path = saved
    data = bytearray((path / "adapter.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors alone would load it
    (path / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="do not match the digest"):
        peftmed.load_adapter(fresh(), path)


def _rewrite(path, change):
    """Rewrite the weights with ``change(tensors)`` and fix up the manifest's digest, so only the change
    itself can be refused."""
    from peftmed.files import sha256_file

    tensors = load_file(str(path / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "adapter.safetensors"))
    manifest = json.loads((path / "adapter.json").read_text())
    manifest["weights_sha256"] = sha256_file(path / "adapter.safetensors")
    (path / "adapter.json").write_text(json.dumps(manifest))


def test_non_finite_values_are_refused_by_default(saved):
    _, path = saved
    key = next(k for k in load_file(str(path / "adapter.safetensors")) if k.endswith("lora_B"))
    _rewrite(path, lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(AdapterError, match=f"tensor '{key}' .* holds 1 NaN or infinite value"):
        peftmed.load_adapter(fresh(), path)


def test_a_dtype_other_than_the_manifest_is_refused(saved):
    _, path = saved
    key = next(iter(load_file(str(path / "adapter.safetensors"))))

    def to_half(t):
        t[key] = t[key].half()

    _rewrite(path, to_half)
    with pytest.raises(AdapterError, match=f"tensor '{key}' .* has dtype float16; the manifest says float32"):
        peftmed.load_adapter(fresh(), path)


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(format_version="abc"), "format_version is 'abc'; expected a positive integer"),
    (lambda m: m.update(methods="x"), "methods is 'x'; expected a mapping"),
    (lambda m: m["tensors"][next(iter(m["tensors"]))].pop("shape"), r"\.shape is None; expected a list"),
    (lambda m: m.update(adapter_name="my.adapter"), "adapter name 'my.adapter' is not valid"),
    (lambda m: m.update(tensors=[1, 2]), "tensors is \\[1, 2\\]; expected a mapping"),
    (lambda m: m.update(backbone=7), "backbone is 7"),
])
def test_malformed_manifests_are_named_not_tracebacks(saved, change, needle):
    _, path = saved
    manifest = json.loads((path / "adapter.json").read_text())
    change(manifest)
    (path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match=needle):
        peftmed.load_adapter(fresh(), path)


def test_adapter_names_with_a_dot_are_refused():
    with pytest.raises(AdapterError, match="adapter name 'a.b' is not valid"):
        peftmed.apply(fresh(), "*=layernorm", adapter_name="a.b")


# ---- the tokenizer an adapter was trained with (defect 3) -------------------------------------------
def test_an_adapter_refuses_a_model_with_another_tokenizer(saved):
    pm, path = saved
    manifest = json.loads((path / "adapter.json").read_text())
    assert len(manifest["tokenizer"]["sha256"]) == 64
    other = fresh(texts=["an entirely different vocabulary of words", "nothing medical here"])
    with pytest.raises(AdapterError, match="trained with another tokenizer"):
        peftmed.load_adapter(other, path)
    peftmed.load_adapter(fresh(), path)  # the same (default) tokenizer loads


# ---- saving never deletes a user's file ------------------------------------------------------------
def test_saving_over_an_adapter_folder_keeps_other_files(saved):
    pm, path = saved
    (path / "NOTES.md").write_text("my notes")
    pm.save_adapter(path)
    assert (path / "NOTES.md").read_text() == "my notes"
    assert sorted(p.name for p in path.iterdir()) == ["NOTES.md", "adapter.json", "adapter.safetensors"]


# ---- options (defect 7) -----------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, error, needle", [
    ("fusion=lora(r=1e9)", ConfigError, r"option r expects an integer, got 1000000000.0 \(a float"),
    ("fusion=lora(alpha=1e999)", ConfigError, "option alpha must be a finite number, got inf"),
    ("fusion=prefix(n=0)", ConfigError, r"\(n\) must be a positive integer .*got n=0"),
    ("fusion=lora(r=100000)", RecipeError, "LoRA rank r=100000 exceeds this layer's size"),
])
def test_out_of_range_method_options_are_refused_before_any_allocation(recipe, error, needle):
    with pytest.raises(error, match=needle):
        peftmed.apply(fresh(), recipe)


# ---- metrics (defect 7) -----------------------------------------------------------------------------
def test_an_int_and_a_string_qid_are_not_merged():
    from peftmed.data import VQARecord
    from peftmed.metrics import MetricError

    rec = VQARecord(qid="680", question="q?", answer="yes", answer_type="CLOSED", image="x.png", image_id="x")
    assert vqa_scores({680: "yes"}, [rec])["acc_overall"] == 1.0  # an int key alone is fine
    with pytest.raises(MetricError, match="qid '680' twice"):
        vqa_scores({680: "yes", "680": "no"}, [rec])
