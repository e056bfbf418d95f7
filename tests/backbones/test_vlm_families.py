"""Today's Med-VLM families (Qwen2/2.5/3-VL, Gemma 3, InternVL, LLaVA-NeXT/OneVision, Idefics3, PaliGemma, Mllama)
through one generic backbone, on tiny random models transformers builds here: components and roles found in the
module structure, every method trains on every component, adapters save and load exactly, export to peft and
merge into a plain transformers folder give the same logits, real sizes by name on the meta device."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.backbones.hf import vlm  # noqa: E402
from peftmed.backbones.hf.families import FAMILIES  # noqa: E402
from peftmed.errors import ConfigError, PeftmedError, RecipeError  # noqa: E402

FAMS = [f for f in sorted(FAMILIES) if all(importlib.util.find_spec(p) for p in FAMILIES[f].get("requires", ()))]
QWEN = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
LORA_ALL = "vision=lora(r=4) projector=lora(r=4,roles=mlp.up+mlp.down) llm=lora(r=4)"


@pytest.fixture(scope="module")
def registry():
    return peftmed.build_registry()


def _batch(model, n=2, seed=0):
    (batch,) = model.example_inputs(n, generator=torch.Generator().manual_seed(seed))
    return batch


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)["logits"]


@pytest.mark.parametrize("family", FAMS)
def test_components_and_roles_are_found_in_the_module_structure(family, registry):
    bb = registry.backbone(family)
    model = bb.build()
    assert dict(bb.components) == vlm.discover(model.model, root="model")  # found on the meta device = found here
    roles = {comp: {r for r in bb.declared_roles(comp) if bb.match(model, comp, r)} for comp in bb.components}
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "norm", "head", "embed",
            "self_attention"} <= roles["llm"], roles["llm"]
    assert ({"attn.q", "attn.v"} <= roles["vision"] or "attn.qkv" in roles["vision"]) and "attn.o" in roles["vision"]
    assert {"mlp.up", "mlp.down", "patch"} <= roles["vision"], roles["vision"]
    assert roles["projector"] & {"mlp.up", "norm"}, roles["projector"]
    # no module belongs to two components
    seen = {}
    for comp in bb.components:
        for path, root in bb.component_roots(model, comp):
            for name, p in root.named_parameters():
                full = f"{path}.{name}"
                assert full not in seen, f"{full} is in {seen.get(full)} and {comp}"
                seen[full] = comp
    total = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # and every parameter belongs to one, except those held by the inner model itself (LLaVA-NeXT's image_newline)
    loose = {f"model.model.{n}" for n, _ in model.model.model.named_parameters(recurse=False)}
    assert set(seen) == total - loose
    if family == "mllama":
        assert {"cross.q", "cross.k", "cross.v", "cross.o", "cross_attention"} <= roles["fusion"]


RECIPES = ["vision=ia3 llm=ia3", "vision=layernorm llm=layernorm", "*=bitfit", "llm=ffn vision=attention",
           "projector=full", "llm=prefix(n=4)", "llm=ptuning-v2(n=4)", "vision=prefix(n=3)"]


@pytest.mark.parametrize("family", FAMS)
def test_every_method_reaches_the_loss_on_every_family(family, registry):
    """Every parameter a method trains receives a non-zero gradient (none sits where the loss cannot see it)."""
    bb = registry.backbone(family)
    for recipe in RECIPES:
        if recipe == "vision=prefix(n=3)" and family in QWEN:
            with pytest.raises(RecipeError, match="cannot take a key/value prefix"):
                peftmed.apply(bb.build(), recipe, registry=registry)
            continue
        pm = peftmed.apply(bb.build(), recipe, registry=registry)
        pm.compute_loss(_batch(pm.base_model)).backward()
        trained = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        assert trained, recipe
        dead = [n for n, p in trained.items() if p.grad is None or not p.grad.any()]
        assert not dead, f"{family} {recipe}: no gradient reaches {dead[:3]}"


@pytest.mark.parametrize("family", ["qwen2-vl", "gemma3", "mllama", "paligemma"])
def test_the_loss_reads_logits_only_where_answers_are_and_equals_the_full_sequence_s(family, registry):
    """The language model head runs on the answer's window only (``logits_to_keep``: from the position before the
    earliest answer token to the end; the image and prompt tokens, most of the sequence, make no logits), and
    transformers is not asked for a second loss of its own over the whole sequence: the loss equals cross-entropy
    over the full sequence's logits, to fp32 rounding."""
    model = registry.backbone(family).build().eval()
    batch = _batch(model, 3)
    calls = []
    real = model.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    model.model.forward = spy
    with torch.no_grad():
        out = model(batch)
    (kw,) = calls
    assert "labels" not in kw, "transformers computed a second loss over the whole sequence"
    inputs = model._encode(batch, model._answers(batch), left=False)
    labels = inputs.pop("labels")
    width = labels.shape[1]
    first = min(int((row != -100).nonzero()[0]) for row in labels)
    assert kw["logits_to_keep"] == width - first + 1 < width
    assert out["logits"].shape[1] == width - first + 1 and torch.equal(out["labels"], labels[:, first - 1:])
    with torch.no_grad():
        full = real(**inputs, use_cache=False).logits
    want = torch.nn.functional.cross_entropy(full[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMS)
def test_lora_lowers_the_loss_saves_and_loads_exactly(family, registry, tmp_path):
    bb = registry.backbone(family)
    model = bb.build()
    # a projector without linear layers (Gemma 3's is a norm and a bare weight) is refused by name
    recipe = LORA_ALL if bb.match(model, "projector", "mlp.up") else LORA_ALL.replace(
        " projector=lora(r=4,roles=mlp.up+mlp.down)", "")
    if recipe != LORA_ALL:
        with pytest.raises(peftmed.errors.NoMatchError, match="projector.*its roles: norm"):
            peftmed.apply(bb.build(), LORA_ALL, registry=registry)
    pm = peftmed.apply(model, recipe, registry=registry)
    batch = _batch(pm.base_model, 4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(20):
        loss = pm.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] - losses[-1] > 0.15 and losses[-1] < min(losses[:10]), losses  # nats
    pm.eval()
    ours = _logits(pm, batch)
    pm.save_adapter(tmp_path / "a")
    back = peftmed.load_adapter(bb.build(), tmp_path / "a", registry=registry)
    back.eval()
    assert torch.equal(_logits(back, batch), ours)
    answers = back.base_model.generate(batch, max_new_tokens=3)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("family", FAMS)
def test_exported_lora_loads_in_peft_and_merges_into_a_plain_folder(family, registry, tmp_path):
    from peftmed.interop import export_to_peft
    from peftmed.testing import helpers as h

    peft = pytest.importorskip("peft")
    bb = registry.backbone(family)
    pm = peftmed.apply(bb.build(), "vision=lora(r=4,alpha=8) llm=lora(r=2,alpha=4)", registry=registry)
    h.perturb_(pm.adapter_tensors(), seed=1)
    pm.eval()
    batch = _batch(pm.base_model)
    ours = _logits(pm, batch)
    assert not torch.allclose(ours, _logits(bb.build().eval(), batch))
    pm.save_adapter(tmp_path / "mine")
    export_to_peft(tmp_path / "mine", tmp_path / "peft", registry=registry)
    wrapper = bb.build()
    peft.PeftModel.from_pretrained(wrapper.model, str(tmp_path / "peft"))
    wrapper.eval()
    torch.testing.assert_close(_logits(wrapper, batch), ours, rtol=1e-5, atol=1e-5)

    # a LoRA trained with peft on the same transformers model imports to the same logits
    from peftmed.interop import import_from_peft

    trained = bb.build()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*(language_model|text_model)\..*\.(q_proj|v_proj)",
                             init_lora_weights=False)
    peft.get_peft_model(trained.model, config).save_pretrained(str(tmp_path / "theirs"))
    trained.eval()
    theirs = _logits(trained, batch)
    import_from_peft(tmp_path / "theirs", tmp_path / "imported", backbone=family, registry=registry)
    imported = peftmed.load_adapter(bb.build(), tmp_path / "imported", registry=registry).eval()
    torch.testing.assert_close(_logits(imported, batch), theirs, rtol=1e-5, atol=1e-5)

    merged = pm.merge_and_unload()
    merged.model.save_pretrained(str(tmp_path / "merged"))
    plain = vlm.model_class(FAMILIES[family]["model_type"]).from_pretrained(str(tmp_path / "merged"))
    fresh = bb.build()
    fresh.model = plain.eval()
    torch.testing.assert_close(_logits(fresh, batch), ours, rtol=1e-5, atol=1e-5)


def test_a_prefix_is_attended_unrotated_as_the_reference_computes_it(registry):
    """Qwen2-VL's text attention (multimodal rotary positions, grouped KV heads) with a prefix, against a reference
    written here: q and k rotated by the model's own function, the prefix prepended unrotated, softmax in fp32."""
    import sys

    from peftmed.backbones.hf.prefix import make_prefix_capable

    model = registry.backbone("qwen2-vl").build()
    attn = model.model.model.language_model.layers[0].self_attn
    wrapped = make_prefix_capable(attn)
    assert wrapped is not None
    modeling = sys.modules[type(attn).__module__]
    b, t, h, d = 2, 5, attn.config.num_attention_heads, attn.head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, attn.config.hidden_size, generator=g)
    position_ids = torch.arange(t).expand(3, b, t)
    cos, sin = model.model.model.language_model.rotary_emb(x, position_ids)
    pk, pv = torch.randn(h, 3, d, generator=g), torch.randn(h, 3, d, generator=g)
    with torch.no_grad():
        plain, _ = wrapped(x, position_embeddings=(cos, sin), attention_mask=None)
        ref_plain, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        assert torch.equal(plain, ref_plain)  # without a prefix: the original forward, bit for bit
        wrapped.prefix_provider = lambda: (pk, pv)
        out, _ = wrapped(x, position_embeddings=(cos, sin), attention_mask=None)

        q = attn.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)  # cos/sin already carry the 3-D (mrope) sections
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
        values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
        scores = (q @ keys.transpose(-1, -2)) * d ** -0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        visible = torch.cat([torch.ones(t, 3, dtype=torch.bool), causal], 1)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        ref = attn.o_proj((weights @ values).transpose(1, 2).reshape(b, t, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, plain)


def _hand_count_qwen2_vl_2b() -> int:
    """Qwen2-VL-2B's parameters counted from its published dimensions, layer by layer."""
    hid, inter, layers, heads, kv, vocab = 1536, 8960, 28, 12, 2, 151936
    hd = hid // heads
    attn = hid * hid + hid + 2 * (hid * kv * hd + kv * hd) + hid * hid  # q (bias), k v (bias), o
    llm = vocab * hid + layers * (attn + 3 * hid * inter + 2 * hid) + hid  # embeddings tied to the head
    vd, vl, vmlp, patch = 1280, 32, 1280 * 4, 3 * 2 * 14 * 14
    vblock = 2 * 2 * vd + (vd * 3 * vd + 3 * vd) + (vd * vd + vd) + (vd * vmlp + vmlp) + (vmlp * vd + vd)
    merged = vd * 4
    merger = 2 * vd + (merged * merged + merged) + (merged * hid + hid)
    return llm + patch * vd + vl * vblock + merger


def _hand_count_qwen25_7b_text(vocab: int) -> int:
    """Qwen2.5-7B's decoder by hand: q (with bias), k and v (grouped, 4 heads of 128, with bias), o, the gated MLP,
    two RMSNorms a layer; the input embedding, an untied LM head and the final norm."""
    h, i, layers, kv = 3584, 18944, 28, 4 * 128
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return layers * layer + 2 * vocab * h + h


def test_real_sizes_by_name_on_the_meta_device(registry):
    assert vlm.parameter_count("qwen2-vl", "qwen2-vl-2b") == _hand_count_qwen2_vl_2b() == 2_208_985_600
    for family, fam in FAMILIES.items():
        for preset, spec in fam["presets"].items():
            with torch.device("meta"):
                model = registry.backbone(preset).build()
            n = sum(p.numel() for p in model.parameters())
            if spec.get("params"):
                assert n == spec["params"], (preset, n)
            if preset == "internvl3-8b":  # its language model is Qwen2.5-7B (untied head) at InternVL's vocabulary
                llm = sum(p.numel() for n, p in model.named_parameters() if ".language_model." in n or "lm_head" in n)
                assert llm == _hand_count_qwen25_7b_text(vocab=151674) == 7_612_820_992
            pm = peftmed.apply(model, "llm=lora(r=8)", registry=registry)
            report = pm.trainable_report() if hasattr(pm, "trainable_report") else None
            trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            assert trained > 0 and (report is None or str(trained) in str(report).replace(",", ""))


def test_models_it_cannot_take_apart_are_refused_by_name(tmp_path, registry):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50))
    with pytest.raises(ConfigError, match="no a vision tower|no a|vision tower") as err:
        vlm.discover(lm, root="")
    assert "embed_tokens" in str(err.value) or "layers" in str(err.value)

    model = registry.backbone("qwen2-vl").build()
    model.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ConfigError, match="holds a 'qwen2_vl' model.*--backbone qwen2-vl"):
        registry.backbone("gemma3").from_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen" / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        registry.backbone("qwen2-vl").from_pretrained(tmp_path / "qwen")
    with pytest.raises(PeftmedError, match="does not exist"):
        registry.backbone("qwen2-vl").from_pretrained(tmp_path / "nothing")


def test_a_saved_folder_loads_strictly_and_gives_the_same_answers(registry, tmp_path):
    bb = registry.backbone("gemma3")
    model = bb.build().eval()
    batch = _batch(model)
    model.save_pretrained(tmp_path / "g")
    back = bb.from_pretrained(tmp_path / "g").eval()
    assert torch.equal(_logits(back, batch), _logits(model, batch))
    assert back.generate(batch, max_new_tokens=3) == model.generate(batch, max_new_tokens=3)
    from safetensors.torch import load_file, save_file

    file = next((tmp_path / "g").glob("*.safetensors"))
    tensors = load_file(str(file))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(PeftmedError, match="missing"):
        bb.from_pretrained(tmp_path / "g")


@pytest.mark.skipif(importlib.util.find_spec("num2words") is not None, reason="num2words is installed")
def test_a_family_whose_processor_needs_a_missing_package_names_it(registry):
    with pytest.raises(ConfigError, match="smolvlm.*num2words"):
        registry.backbone("smolvlm").build()


def test_the_default_bench_suite_runs_its_language_rows_on_the_llm():
    """The default suite names fusion and decoder (MISS, BLIP); on a vision | projector | llm family those rows
    train the llm, labelled so, and Mllama's cross-attention layers (its fusion) keep theirs."""
    from peftmed.bench.suites import builtin_suite, for_backbone

    rows = {e.label: e for e in builtin_suite("default")}
    lora, prefix = rows["F|LoRA|LoRA r=8"], rows["F|Prefix|Prefix"]
    assert for_backbone(lora, ["vision", "projector", "llm"]).recipe == "llm=lora(r=8,alpha=16)"
    assert for_backbone(lora, ["vision", "projector", "llm"]).label == "llm LoRA r=8"
    assert for_backbone(prefix, ["vision", "projector", "llm", "fusion"]).recipe == "fusion=prefix llm=prefix"
    assert for_backbone(lora, ["vision", "fusion", "decoder"]) == lora  # MISS and BLIP: as written
    assert for_backbone(rows["layernorm"], ["vision", "projector", "llm"]) == rows["layernorm"]


def test_plan_measures_a_family_and_narrows_a_real_one_as_its_heads_allow(registry):
    from peftmed.memory.plan import _width_divisors, plan_memory

    plan = plan_memory(registry.backbone("qwen2-vl"), "vision=layernorm llm=lora(r=8)", batch_size=2, seq_len=16,
                       registry=registry)
    assert {"vision", "projector", "llm"} <= {r.component for r in plan.rows}
    assert next(r for r in plan.rows if r.component == "llm").activations > 0
    # Qwen2-VL's vision blocks are a ModuleList (iterated, never called): what they save is still the vision's
    assert next(r for r in plan.rows if r.component == "vision").activations > 0
    # MedGemma's SigLIP tower has 16 heads of 72: 1/16 of its width would leave heads of 4.5
    assert _width_divisors(registry.backbone("medgemma-4b"), {}) == (2, 4)
    # Qwen2-VL's vision heads are 80 wide and rotate in quarters: 1/8 would leave 10, whose forward fails
    assert _width_divisors(registry.backbone("qwen2-vl-2b"), {}) == (2, 4)
    real = plan_memory(registry.backbone("qwen2-vl-2b"), "vision=layernorm llm=lora(r=8)", seq_len=8,
                       registry=registry)
    vision = next(r for r in real.rows if r.component == "vision")
    assert vision.activations > 0 and real.settings["activations"].startswith("measured at widths 1/2 and 1/4")


def test_a_model_of_a_family_without_data_is_taken_apart_by_its_structure(registry):
    """backbone_for: any transformers image-text-to-text model with the common layout (here a raw LLaVA-NeXT model,
    as a family transformers adds later would come) gets components, roles and every method from its structure."""
    model = registry.backbone("llava-next").build().model  # the transformers model itself, no peftmed wrapper
    bb = vlm.backbone_for(model)
    assert dict(bb.components) == {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                                   "llm": ("model.language_model", "lm_head")}
    pm = peftmed.apply(model, "vision=layernorm llm=lora(r=4) projector=lora(r=4,roles=mlp.up+mlp.down)",
                       backbone=bb, registry=registry)
    names = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("language_model" in n and "lora" in n for n in names)
    assert any("multi_modal_projector.linear_1" in n for n in names)
    assert any("vision_tower" in n and "layer_norm" in n for n in names)
    assert not any("post_layernorm" in n for n in names)  # LLaVA-NeXT takes the features before it
