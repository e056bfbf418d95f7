"""hf-blip-vqa and hf-llava: the VQA task protocol, recipes of every inject/select method, saving and
loading a local folder, and bad input. Tiny presets; nothing is downloaded."""

import json
import re
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peftmed  # noqa: E402
from peftmed.errors import ConfigError, PeftmedError, ShapeError  # noqa: E402

VQA_BACKBONES = ("hf-blip-vqa", "hf-llava")

# One recipe per method on a component it applies to, per backbone (LLaVA's Llama has no biases,
# so BitFit goes to its CLIP tower).
RECIPES = {
    "hf-blip-vqa": ("fusion=lora(r=4,alpha=8)", "decoder=ia3", "vision=layernorm", "fusion=ffn",
                    "decoder=attention", "vision=bitfit", "fusion=full"),
    "hf-llava": ("llm=lora(r=4,alpha=8)", "llm=ia3", "vision=layernorm", "projector=ffn", "llm=attention",
                 "vision=bitfit", "projector=full"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(name, **options):
    model = peftmed.build_backbone(name, **options)
    return model.eval()


def make_batch(model, n=2, seed=0):
    (batch,) = model.example_inputs(batch=n, generator=torch.Generator().manual_seed(seed))
    return batch


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_loss_backward_and_generation_shapes(name):
    model = build(name)
    batch = make_batch(model)
    assert batch["images"].shape == (2, 3, model.image_size, model.image_size)
    loss = model.compute_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # an untrained model is near uniform over the vocabulary: loss ~ ln(vocab)
    vocab = len(model.tokenizer)
    assert 0.5 * torch.log(torch.tensor(float(vocab))) < loss < 2 * torch.log(torch.tensor(float(vocab)))
    loss.backward()
    bb = peftmed.get_backbone(name)
    for comp in bb.components:
        grads = [p.grad for p in bb.component_module(model, comp).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches component {comp}"
    for beams in (1, 3):
        answers = model.generate(batch, max_new_tokens=4, num_beams=beams)
        assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_learns_answers_and_generates_them_greedy_and_beam(name):
    """Training and generation agree on the prompt, start token and stop token: after overfitting two
    samples, both decoders produce exactly the trained answers."""
    torch.manual_seed(0)
    model = build(name).train()
    batch = {"images": make_batch(model)["images"], "questions": ["is the heart enlarged?", "where is the lesion?"],
             "answers": ["yes", "left temporal lobe"], "qids": [1, 2]}
    first = model.compute_loss(batch).item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = model.compute_loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    model.eval()
    assert model.generate(batch, num_beams=1) == batch["answers"]
    assert model.generate(batch, num_beams=3) == batch["answers"]
    assert model.training is False  # generate restores the mode it found


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_save_and_load_local_folder_gives_identical_outputs(name, tmp_path):
    bb = peftmed.get_backbone(name)
    model = build(name)
    batch = make_batch(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = bb.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.peftmed_backbone == name
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert (loaded.image_size, loaded.image_mean, loaded.image_std) == (model.image_size, model.image_mean,
                                                                        model.image_std)
    with torch.no_grad():
        torch.testing.assert_close(loaded.compute_loss(batch), model.compute_loss(batch), rtol=0, atol=0)
    assert loaded.generate(batch, max_new_tokens=5, num_beams=2) == model.generate(batch, max_new_tokens=5, num_beams=2)


@pytest.mark.parametrize("name,recipe", [(n, r) for n in VQA_BACKBONES for r in RECIPES[n]])
def test_method_recipe_trains_only_its_component(name, recipe):
    bb = peftmed.get_backbone(name)
    model = build(name)
    pm = peftmed.apply(model, recipe)
    component = recipe.split("=")[0]
    prefixes = tuple(f"base_model.{path}." for path in bb.component_paths(component))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable, recipe
    outside = [n for n in trainable if not n.startswith(prefixes)]
    assert not outside, f"{recipe} trains parameters outside {component}: {outside[:3]}"
    assert sum(p.numel() for p in trainable.values()) == pm.trainable_report().rows[0].trainable
    loss = pm.compute_loss(make_batch(model))
    loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad <= set(trainable), f"gradients on frozen parameters: {sorted(with_grad - set(trainable))[:3]}"
    assert any(trainable[n].grad.abs().sum() > 0 for n in with_grad), f"{recipe}: no gradient reaches the adapter"


def test_inject_methods_leave_outputs_unchanged_at_init():
    model = build("hf-blip-vqa")
    batch = make_batch(model)
    with torch.no_grad():
        base = model.compute_loss(batch)
        pm = peftmed.apply(model, "vision=lora(r=4) fusion=ia3 decoder=lora(r=4)")
        torch.testing.assert_close(pm.compute_loss(batch), base)


def _layers(model):
    """(layers, width) of the text side: BLIP's question encoder / answer decoder, LLaVA's LM."""
    text = model.model.config.text_config
    return text.num_hidden_layers, text.hidden_size


def test_recipe_check_prints_the_papers_row_and_counts(capsys):
    from peftmed.cli import main

    model = build("hf-blip-vqa")
    layers, width = _layers(model)
    assert main(["recipe", "check", "F|LoRA|LoRA", "--backbone", "hf-blip-vqa"]) == 0
    out = capsys.readouterr().out
    assert "(F|LoRA|LoRA)" in out
    # query and value of the self- and cross-attention per layer, r=8: A (8 x in) + B (out x 8)
    def lora_count(prefix):
        return sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if n.startswith(prefix) and re.search(r"(attention|crossattention)\.self\.(query|value)$", n))

    fusion, decoder = lora_count("model.text_encoder."), lora_count("model.text_decoder.")
    assert fusion > layers * 2 * 8 * (width + width)  # more than self-attention alone: cross-attention too
    assert f"{fusion:,}" in out and f"{decoder:,}" in out and f"{fusion + decoder:,}" in out

    assert main(["recipe", "check", "*=layernorm", "-b", "hf-blip-vqa", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    norms = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    assert sum(r["trainable"] for r in report["rows"]) == norms


def test_recipe_check_on_llava_row_form(capsys):
    from peftmed.cli import main

    model = build("hf-llava")
    layers, width = _layers(model)
    assert main(["recipe", "check", "F|T|LoRA", "-b", "hf-llava"]) == 0
    out = capsys.readouterr().out
    assert "(F|T|LoRA)" in out
    projector = sum(p.numel() for p in model.model.model.multi_modal_projector.parameters())
    text = model.model.config.text_config
    kv_width = text.num_key_value_heads * (width // text.num_attention_heads)
    lora = layers * 8 * ((width + width) + (width + kv_width))  # q: d -> d, v: d -> kv heads
    assert f"{projector:,}" in out and f"{lora:,}" in out


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_wrong_image_size_dtype_or_channels_is_a_clear_error(name):
    model = build(name)
    batch = make_batch(model)
    s = model.image_size
    with pytest.raises(ShapeError, match=f"{s} x {s}"):
        model.compute_loss(dict(batch, images=torch.zeros(2, 3, s + 8, s + 8, dtype=torch.uint8)))
    with pytest.raises(ShapeError, match="uint8"):
        model.generate(dict(batch, images=batch["images"].float() / 255))
    with pytest.raises(ShapeError, match="4 channels"):
        model.compute_loss(dict(batch, images=torch.zeros(2, 4, s, s, dtype=torch.uint8)))


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_missing_or_empty_folder_names_the_path(name, tmp_path):
    bb = peftmed.get_backbone(name)
    with pytest.raises(PeftmedError, match="does not exist") as err:
        bb.from_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftmedError, match="is empty"):
        bb.from_pretrained(tmp_path / "empty")


def test_tokenizer_larger_than_the_vocabulary_fails_before_training():
    from peftmed.backbones.hf import blip, llava
    from peftmed.backbones.hf.tokenizer import bpe_tokenizer, wordpiece_tokenizer

    tok = wordpiece_tokenizer(vocab_size=400)
    config = blip.blip_config("tiny", vocab_size=len(tok) - 10, bos_token_id=5, sep_token_id=3, pad_token_id=0)
    with pytest.raises(ConfigError, match=f"{len(tok)} tokens .* {len(tok) - 10}"):
        peftmed.build_backbone("hf-blip-vqa", config=config, tokenizer=tok)
    tok = bpe_tokenizer(vocab_size=500)
    config = llava.llava_config("tiny", len(tok) - 1, image_token_id=4, pad_token_id=0, bos_token_id=2,
                                eos_token_id=3)
    with pytest.raises(ConfigError, match="vocab_size"):
        peftmed.build_backbone("hf-llava", config=config, tokenizer=tok)


def test_checkpoint_with_missing_or_mismatched_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    bb = peftmed.get_backbone("hf-blip-vqa")
    build("hf-blip-vqa").save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    state = load_file(str(weights))
    dropped = "text_encoder.encoder.layer.0.attention.self.query.weight"
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PeftmedError, match=f"missing \\(1\\): {dropped}"):
        bb.from_pretrained(tmp_path / "a")
    assert bb.from_pretrained(tmp_path / "a", strict=False) is not None  # explicit opt-out loads

    build("hf-blip-vqa").save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PeftmedError, match="shape-mismatched"):
        bb.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_long_questions_are_truncated_counted_and_reported(name, caplog):
    model = build(name, max_question_tokens=6)
    batch = make_batch(model)
    batch["questions"] = ["is there " + "a very large mass in the left upper lobe and " * 5 + "?", "no?"]
    with caplog.at_level(logging.WARNING, logger="peftmed.backbones.hf"):
        loss = model.compute_loss(batch)
    assert torch.isfinite(loss)
    assert model.truncated_questions == 1
    assert "1 question(s) longer than 6 tokens were truncated" in caplog.text


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_fresh_builds_are_identical(name):
    """An adapter trained on one fresh build loads onto another: same vocabulary, same weights."""
    a, b = build(name), build(name)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


def test_blip_reads_a_bert_vocabulary_file(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "mass", "?", "yes", "no", "##es"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    model = build("hf-blip-vqa", vocab_file=str(tmp_path / "vocab.txt"))
    ids = model.tokenizer("Is there a mass?")["input_ids"]
    assert model.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "is", "there", "a", "mass", "?", "[SEP]"]
    assert ids == [2, 5, 6, 7, 8, 9, 3]  # the file's line numbers
    # [DEC] / [ENC] are appended, and the model's vocabulary is sized to the tokenizer
    assert model.model.config.text_config.vocab_size == len(model.tokenizer) == len(words) + 2
    assert torch.isfinite(model.compute_loss(make_batch(model)))


@pytest.mark.parametrize("name", VQA_BACKBONES)
def test_runs_on_real_vqa_rad_batches_with_a_tokenizer_from_its_text(name, vqa_rad_dir):
    from peftmed.data.dataset import VQADataset, collate
    from peftmed.data.records import load_records

    records = load_records("vqa-rad", "train", data_dir=vqa_rad_dir)
    texts = [t for r in records for t in (r.question, r.answer)]
    model = build(name, texts=texts)
    # a frequent dataset word absent from the built-in corpus takes fewer pieces once the dataset's text is used
    from collections import Counter

    from peftmed.backbones.hf.tokenizer import CORPUS

    known = " ".join(CORPUS)
    counts = Counter(w for t in texts for w in t.lower().replace("?", " ").split() if len(w) > 5 and w not in known)
    word = counts.most_common(1)[0][0]
    default = build(name).tokenizer
    assert len(model.tokenizer.tokenize(" " + word)) < len(default.tokenize(" " + word)), word
    batch = collate([VQADataset(records[:3], model.image_size)[i] for i in range(3)])
    assert torch.isfinite(model.compute_loss(batch))
    assert len(model.generate(batch, max_new_tokens=3, num_beams=2)) == 3


def test_blip_base_at_480px_has_the_miss_base_parameter_count_and_ln_share():
    """MISS is BLIP's VQA graph: transformers' BLIP at MISS's 480 px has its 361,478,972 parameters
    (the MILE tables' denominator), and LayerNorm-tuning trains about 0.04% of them."""
    with torch.device("meta"):
        model = peftmed.build_backbone("hf-blip-vqa", preset="base", image_size=480)
    assert model.image_size == 480
    assert sum(p.numel() for p in model.parameters()) == 361_478_972
    report = peftmed.apply(model, "*=layernorm", keep_base=False).trainable_report()
    share = sum(r.trainable for r in report.rows) / report.total_base
    assert 0.0003 < share < 0.0005


def test_llava_loss_covers_the_answer_tokens_only():
    """The loss equals the cross-entropy of the answer tokens + </s>, recomputed from the logits."""
    import torch.nn.functional as F

    model = build("hf-llava")
    batch = make_batch(model)
    batch["answers"] = ["yes", "right lower lobe"]
    with torch.no_grad():
        out = model(batch)
    tok = model.tokenizer
    losses = []
    for i, (question, answer) in enumerate(zip(batch["questions"], batch["answers"])):
        prompt = model._prompt(question)[0]
        target = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        start = len(prompt) - 1  # the logit at position t predicts token t + 1
        logits = out["logits"][i, start:start + len(target)]
        losses.append(F.cross_entropy(logits, torch.tensor(target), reduction="none"))
    torch.testing.assert_close(out["loss"], torch.cat(losses).mean())


def test_llava_template_without_image_or_question_is_refused():
    with pytest.raises(ConfigError, match="template"):
        build("hf-llava", template="USER: {question} ASSISTANT:")
    with pytest.raises(ConfigError, match="template"):
        build("hf-llava", template="USER: <image> ASSISTANT:")
