"""Prefix-tuning / P-Tuning v2 on transformers models: BLIP (vision, text encoder, text decoder) and
LLaVA (CLIP vision tower, Llama LLM), made prefix-capable per instance. Includes the case where
peft 0.21.2's prefix tuning fails on BlipForQuestionAnswering."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.errors import ConfigError  # noqa: E402
from peftmed.backbones.hf.prefix import PrefixCapableAttention as PrefixAttention  # noqa: E402
from peftmed.backbones.hf.prefix import make_prefix_capable  # noqa: E402

transformers = pytest.importorskip("transformers")

BLIP_BACKBONE = peftmed.Backbone(
    "test-tiny-blip",
    components={"vision": "vision_model", "fusion": "text_encoder", "decoder": "text_decoder"},
    roles={"self_attention": (r"self_attn$", r"\.attention\.self$"), "cross_attention": r"crossattention\.self$",
           "attn.q": r"\.attention\.self\.query$", "attn.v": r"\.attention\.self\.value$"},
    prefix_wrapper=make_prefix_capable,  # how transformers' attention takes a prefix
)
LLAVA_BACKBONE = peftmed.Backbone(
    "test-tiny-llava",
    components={"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                "llm": "model.language_model"},
    roles={"self_attention": r"self_attn$"},
    prefix_wrapper=make_prefix_capable,
)
IMAGE_TOKEN = 63


def tiny_blip(seed=0):
    from transformers import BlipConfig, BlipForQuestionAnswering

    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=40, encoder_hidden_size=32, bos_token_id=1, pad_token_id=0, sep_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision)).eval()


def blip_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded question
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 60, (2, 3), generator=g)], 1)}


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return transformers.LlavaForConditionalGeneration(config).eval()


def llava_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((2, 5), IMAGE_TOKEN), torch.randint(3, 60, (2, 5), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def randomise_(pm, seed=3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def train(pm, batch, steps=8, lr=3e-2):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.eval()
    return losses


# ---- the case peft 0.21.2 fails on ---------------------------------------------------------------------


def test_blip_prefix_tuning_trains_all_three_components_where_peft_fails():
    peft = pytest.importorskip("peft")
    batch = blip_batch()
    # peft's prefix tuning on the same tiny BLIP: KeyError without a task type, and BlipEncoder
    # receiving inputs_embeds twice with SEQ_2_SEQ_LM / CAUSAL_LM
    with pytest.raises(KeyError):
        peft.get_peft_model(tiny_blip(), peft.PrefixTuningConfig(num_virtual_tokens=4))(**batch)
    for task in (peft.TaskType.SEQ_2_SEQ_LM, peft.TaskType.CAUSAL_LM):
        with pytest.raises(TypeError, match="multiple values for keyword argument 'inputs_embeds'"):
            peft.get_peft_model(tiny_blip(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4))(**batch)

    model = tiny_blip()
    pm = peftmed.apply(model, "vision=prefix(n=4) fusion=prefix(n=4) decoder=prefix(n=4)", backbone=BLIP_BACKBONE)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, PrefixAttention)]
    assert len(wrapped) == 6  # 2 vision + 2 encoder + 2 decoder self-attention layers
    pm.train()
    pm(**batch).loss.backward()
    for key, module in pm.prompt_modules.items():  # every component's prefix gets a gradient
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), key
    assert all(p.grad is None for p in model.parameters())
    losses = train(pm, batch)
    assert losses[-1] < 0.97 * losses[0], losses  # prefixes alone, on a random tiny BLIP: a small but real drop


# ---- identity and the explicit reference ----------------------------------------------------------------


def test_disabled_prompt_adapters_leave_blip_and_llava_unchanged():
    model, batch = tiny_blip(), blip_batch()
    with torch.no_grad():
        expected = model(**batch).loss
        gen = model.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=4)
    pm = peftmed.apply(model, "*=ptuning-v2(n=2,cross=true)", backbone=BLIP_BACKBONE)
    randomise_(pm)
    with torch.no_grad():
        assert not torch.equal(pm(**batch).loss, expected)
        with pm.disable_adapter():
            assert torch.equal(pm(**batch).loss, expected)
            assert torch.equal(pm.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=4), gen)
    model, batch = tiny_llava(), llava_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    pm = peftmed.apply(model, "vision=prefix(n=2) llm=prefix(n=2)", backbone=LLAVA_BACKBONE)
    randomise_(pm)
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(**batch).logits, expected)


def explicit(q, k, v, pk, pv, allowed, scale):
    """softmax(q [pk; k]^T * scale) [pv; v] with the prefix repeated per sample and always visible;
    ``allowed`` (B or 1, 1, Tq, Tk) masks the sequence keys only."""
    b = q.shape[0]
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    scores = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        full = torch.cat([torch.ones(*allowed.shape[:-1], pk.shape[-2], dtype=torch.bool), allowed], -1)
        scores = scores.masked_fill(~full, float("-inf"))
    return scores.softmax(-1) @ v


def heads(x, h):
    return x.view(*x.shape[:-1], h, -1).transpose(1, 2)  # (B, H, T, D)


def merge(x):
    return x.transpose(1, 2).flatten(2)


def test_blip_wrappers_equal_the_explicit_reference():
    model = tiny_blip()
    pm = peftmed.apply(model, "vision=ptuning-v2(n=3) fusion=prefix(n=3,cross=true)", backbone=BLIP_BACKBONE)
    randomise_(pm)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        attn = model.vision_model.encoder.layers[1].self_attn  # fused qkv
        pk, pv = attn.prefix_provider()
        q, k, v = (heads(t, 4) for t in attn.qkv(x).chunk(3, -1))
        ref = attn.projection(merge(explicit(q, k, v, pk, pv, None, 8 ** -0.5)))
        torch.testing.assert_close(attn(x)[0], ref)

        attn = model.text_encoder.encoder.layer[0].attention.self  # self-attention with a padded batch
        pk, pv = attn.prefix_provider()
        pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        additive = (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min
        ref = merge(explicit(heads(attn.query(x), 4), heads(attn.key(x), 4), heads(attn.value(x), 4), pk, pv,
                             pad[:, None, None, :].bool(), 8 ** -0.5))
        torch.testing.assert_close(attn(x, attention_mask=additive)[0], ref)

        attn = model.text_encoder.encoder.layer[1].crossattention.self  # cross-attention (cross=true)
        pk, pv = attn.prefix_provider()
        img = torch.randn(2, 7, 32, generator=g)
        ref = merge(explicit(heads(attn.query(x), 4), heads(attn.key(img), 4), heads(attn.value(img), 4), pk, pv,
                             None, 8 ** -0.5))
        torch.testing.assert_close(attn(x, encoder_hidden_states=img)[0], ref)


def test_llama_wrapper_equals_the_explicit_reference_unrotated_prefix_and_grouped_kv():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model = tiny_llava()
    pm = peftmed.apply(model, "llm=ptuning-v2(n=3)", backbone=LLAVA_BACKBONE)
    randomise_(pm)
    llm = model.model.language_model
    attn = llm.layers[0].self_attn
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(6)[None].expand(2, -1)
    cos, sin = llm.rotary_emb(x, pos)
    with torch.no_grad():
        pk, pv = attn.prefix_provider()
        assert pk.shape == (4, 3, 8)  # one prefix per query head (4), though the model has 2 KV heads
        q, k, v = heads(attn.q_proj(x), 4), heads(attn.k_proj(x), 2), heads(attn.v_proj(x), 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
        ref = attn.o_proj(merge(explicit(q, repeat_kv(k, 2), repeat_kv(v, 2), pk, pv, causal, 8 ** -0.5)))
        torch.testing.assert_close(attn(x, position_embeddings=(cos, sin), attention_mask=None)[0], ref)


# ---- generation -------------------------------------------------------------------------------------


def blip_greedy_reference(model, batch, steps):
    """Greedy decoding by full recomputation, one step at a time (no cache)."""
    cfg = model.config.text_config
    img = model.vision_model(pixel_values=batch["pixel_values"])[0]
    q = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           encoder_hidden_states=img)[0]
    seq = torch.full((q.shape[0], 1), cfg.bos_token_id)
    done = torch.zeros(q.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits = model.text_decoder(input_ids=seq, encoder_hidden_states=q, use_cache=False).logits[:, -1]
        nxt = torch.where(done, torch.full_like(done, cfg.pad_token_id, dtype=torch.long), logits.argmax(-1))
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == cfg.sep_token_id
        if done.all():
            break
    return seq


def test_blip_generation_with_prefix_matches_the_step_by_step_reference():
    model, batch = tiny_blip(), blip_batch()
    pm = peftmed.apply(model, "vision=prefix(n=3) fusion=ptuning-v2(n=3,cross=true) decoder=prefix(n=3,cross=true)",
                       backbone=BLIP_BACKBONE)
    randomise_(pm, scale=1.0)
    ids, pix, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with torch.no_grad():
        greedy = pm.generate(ids, pix, attention_mask=mask, max_new_tokens=6)
        assert torch.equal(greedy, blip_greedy_reference(model, batch, 6))
        with pm.disable_adapter():
            assert not torch.equal(pm.generate(ids, pix, attention_mask=mask, max_new_tokens=6), greedy)

        shapes = []
        attn = model.text_decoder.bert.encoder.layer[0].attention.self
        provider = attn.prefix_provider
        attn.prefix_provider = lambda: shapes.append(provider()[0].shape) or provider()
        beam = pm.generate(ids, pix, attention_mask=mask, max_new_tokens=6, num_beams=3)
        assert shapes and all(s == (4, 3, 8) for s in shapes)  # held once, broadcast over 2 x 3 beams
        attn.prefix_provider = provider
        assert torch.equal(pm.generate(ids, pix, attention_mask=mask, max_new_tokens=6, num_beams=3), beam)
        no_cache = pm.generate(ids, pix, attention_mask=mask, max_new_tokens=6, num_beams=3, use_cache=False)
        assert torch.equal(no_cache, beam)


def test_llava_prefix_on_vision_and_llm_trains_and_generates_like_the_reference(tmp_path):
    model, batch = tiny_llava(), llava_batch()
    pm = peftmed.apply(model, "vision=prefix(n=3) llm=ptuning-v2(n=4,init_std=0.5)", backbone=LLAVA_BACKBONE)
    assert sum(isinstance(m, PrefixAttention) for m in model.modules()) == 4
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100
    losses = train(pm, {**batch, "labels": labels})
    assert losses[-1] < 0.97 * losses[0], losses
    with torch.no_grad():
        out = pm.generate(**batch, max_new_tokens=5, do_sample=False)
        seq = batch["input_ids"]
        for _ in range(5):  # full recomputation, no cache
            nxt = pm(input_ids=seq, pixel_values=batch["pixel_values"], use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
        assert torch.equal(out[:, : seq.shape[1]], seq[:, : out.shape[1]])
        logits = pm(**batch).logits
    pm.save_adapter(tmp_path / "llava")
    loaded = peftmed.load_adapter(tiny_llava(), tmp_path / "llava", backbone=LLAVA_BACKBONE)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)


# ---- save/load, detach, bad input ---------------------------------------------------------------------------


def test_blip_save_load_round_trip_and_remove_restores_the_original_modules(tmp_path):
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    model, batch = tiny_blip(), blip_batch()
    with torch.no_grad():
        base = model(**batch).loss
    pm = peftmed.apply(model, "fusion=prefix(n=3)+lora(r=4) decoder=ptuning-v2(n=3)", backbone=BLIP_BACKBONE)
    randomise_(pm)
    attn = model.text_encoder.encoder.layer[0].attention.self
    assert isinstance(attn, BlipTextSelfAttention)  # the wrapper still passes isinstance checks
    assert type(attn.query).__name__ == "LoraLinear"  # LoRA found the projection by its usual name
    with torch.no_grad():
        expected = pm(**batch).loss
    assert not torch.equal(expected, base)
    pm.save_adapter(tmp_path / "blip")
    loaded = peftmed.load_adapter(tiny_blip(), tmp_path / "blip", backbone=BLIP_BACKBONE)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).loss, expected)
    pm.remove_adapter("default")
    assert not any(isinstance(m, PrefixAttention) for m in model.modules())
    assert type(model.text_encoder.encoder.layer[0].attention.self) is BlipTextSelfAttention
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, base)


def test_prefix_not_below_the_text_position_limit_is_refused():
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=40 is not below the position limit 40 of 'text_encoder"):
        peftmed.apply(tiny_blip(), "fusion=ptuning-v2(n=40)", backbone=BLIP_BACKBONE)
    model = tiny_blip()
    with pytest.raises(ConfigError):
        peftmed.apply(model, "vision=prefix(n=2) fusion=ptuning-v2(n=40)", backbone=BLIP_BACKBONE)
    assert not any(isinstance(m, PrefixAttention) for m in model.modules())  # rolled back
