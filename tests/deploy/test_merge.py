"""peftmed merge: the merged model computes the adapted model's logits (fp32, 1e-5) on every backbone, and the
folder it writes loads without peftmed (plain transformers for BLIP and LLaVA, the MISS checkpoint loader);
prompt methods are refused by name unless kept as an adapter; a 4-bit base is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import peftmed
from peftmed.deploy.merge import merged_model, save_model
from peftmed.errors import ConfigError, PeftmedError

CASES = {
    "miss-tiny": "vision=lora(r=4,roles=[attn.qkv,patch]) fusion=layernorm decoder=lora(r=4)+ia3",
    "hf-blip-vqa": "vision=lora(r=4,roles=[attn.qkv,patch]) fusion=bitfit decoder=lora(r=4)+ia3",
    "hf-llava": "vision=lora(r=4) projector=full llm=lora(r=4,roles=[attn.q,attn.v,mlp.up])+ia3",
}


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _batch(model):
    out = model.example_inputs(3)
    out = out[0] if isinstance(out, tuple) else out
    return out.get("batch", out)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch) if not hasattr(model, "answer_logits") else model.answer_logits(batch)[0]
    return out["logits"] if isinstance(out, dict) else out


def _adapted(registry, backbone):
    bb = registry.backbone(backbone)
    torch.manual_seed(0)
    model = bb.build()
    pm = peftmed.apply(model, CASES[backbone], backbone=bb, registry=registry)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, pm


def _reload(backbone, folder, like):
    """The written folder read back without peftmed's adapters: plain transformers / the MISS checkpoint loader."""
    if backbone == "miss-tiny":
        from peftmed.backbones.miss.checkpoint import from_pretrained

        return from_pretrained(folder, verbose=False)
    if backbone == "hf-blip-vqa":
        from transformers import BlipForQuestionAnswering

        from peftmed.backbones.hf.blip import HFBlipVQA

        return HFBlipVQA(BlipForQuestionAnswering.from_pretrained(str(folder), local_files_only=True), like.tokenizer,
                         max_question_tokens=like.max_question_tokens)
    from transformers import LlavaForConditionalGeneration

    from peftmed.backbones.hf.llava import HFLlava

    return HFLlava(LlavaForConditionalGeneration.from_pretrained(str(folder), local_files_only=True), like.tokenizer)


@pytest.mark.parametrize("backbone", list(CASES))
def test_merged_logits_equal_the_adapted_models_and_the_folder_loads_without_peftmed(registry, backbone, tmp_path):
    model, pm = _adapted(registry, backbone)
    batch = _batch(model)
    adapted = _logits(pm, batch)
    with torch.no_grad():
        base = _logits(registry.backbone(backbone).build(), batch)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter changes the output
    merged, leftover = merged_model(pm)
    assert leftover is None
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), adapted, rtol=0, atol=1e-5)
    written = save_model(merged, tmp_path / "merged")
    assert any(f.endswith(".safetensors") for f in written) and "config.json" in written
    reloaded = _reload(backbone, tmp_path / "merged", merged)
    torch.testing.assert_close(_logits(reloaded, batch), adapted, rtol=0, atol=1e-5)


def test_prompt_methods_are_refused_by_name_or_kept_as_an_adapter(registry, tmp_path):
    bb = registry.backbone("hf-blip-vqa")
    torch.manual_seed(0)
    model = bb.build()
    pm = peftmed.apply(model, "vision=lora(r=4) decoder=prefix(n=4)", backbone=bb, registry=registry)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(model)
    adapted = _logits(pm, batch)
    with pytest.raises(ConfigError, match="decoder=prefix: these methods add prefixes.*--keep-unmergeable"):
        merged_model(pm)
    merged, (calls, tensors) = merged_model(pm, keep_unmergeable=True)
    assert list(calls) == ["decoder"] and calls["decoder"][0]["method"] == "prefix"
    kept = peftmed.apply(merged, calls, backbone=bb, registry=registry)
    with torch.no_grad():
        for k, p in kept.adapter_tensors().items():
            p.copy_(tensors[k])
    torch.testing.assert_close(_logits(kept, batch), adapted, rtol=0, atol=1e-5)


def test_a_4bit_base_is_refused(registry):
    pytest.importorskip("bitsandbytes")
    from peftmed.memory import quantize_nf4

    bb = registry.backbone("hf-llava")
    pm = peftmed.apply(bb.build(), "llm=lora(r=4)", backbone=bb, registry=registry)
    quantize_nf4(pm)
    with pytest.raises(PeftmedError, match="4-bit base.*--quantize none"):
        merged_model(pm)


def test_the_command_merges_a_run_and_plain_transformers_loads_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "peftmed", *a], capture_output=True, text=True, env=env,
                                    cwd=tmp_path, timeout=600)
    r = run("train", "--backbone", "hf-blip-vqa", "--recipe", "vision=lora(r=4) decoder=prefix(n=4)", "--dataset",
            "phantom", "--data-options", "n_images=8", "--steps", "2", "--batch-size", "4", "--evaluate", "false",
            "--progress", "false", "--output", "run")
    assert r.returncode == 0, r.stderr
    refused = run("merge", "--adapter", "run/adapter", "--output", "merged")
    assert refused.returncode == 2 and "decoder=prefix" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "merged").exists()
    ok = run("merge", "--adapter", "run/adapter", "--output", "merged", "--keep-unmergeable")
    assert ok.returncode == 0, ok.stderr
    assert "kept as an adapter (not mergeable): decoder=prefix" in ok.stdout
    code = ("from transformers import BlipForQuestionAnswering as B; m = B.from_pretrained('merged'); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout.startswith("BlipForQuestionAnswering"), plain.stderr
    busy = run("merge", "--adapter", "run/adapter", "--output", "merged", "--keep-unmergeable")
    assert busy.returncode == 2 and "not empty" in busy.stderr
