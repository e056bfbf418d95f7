"""``peftmed convert llava-med``: a fake original-LLaVA checkpoint (the real key names, tiny shapes) converts
into a folder whose model computes the same logits as a reference built directly in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from peftmed.backbones.hf import llava
from peftmed.backbones.hf.convert import ConversionError, convert_llava
from peftmed.backbones.hf.tokenizer import CORPUS
from peftmed.errors import PeftmedError

VOCAB = 300  # the original tokenizer's size; the converted one adds <image> and <pad> and pads to 320
TEXT = {
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
                    rms_norm_eps=1e-5, sliding_window=None),
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6),
}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=32)


def _original_tokenizer(folder):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))


def _reference(text: str, projector: str):
    """A LLaVA at the converted layout (vocabulary 320, <image> = 300), random weights; the rows the
    converter adds (300..319) set to the mean of the others, as the converter makes them."""
    from transformers import LlavaConfig

    config = LlavaConfig(vision_config=dict(VISION, model_type="clip_vision_model"),
                         text_config=dict(TEXT[text], vocab_size=320, pad_token_id=301, bos_token_id=1, eos_token_id=2),
                         image_token_index=VOCAB, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         peftmed_projector=projector, tie_word_embeddings=False)
    model = llava.llava_model(config, seed=3)
    with torch.no_grad():
        for table in (model.model.language_model.embed_tokens.weight, model.lm_head.weight):
            table[VOCAB:] = table[:VOCAB].mean(0)
    return model.eval()


def _clip_name(key: str) -> str:
    """A tower weight's name in a CLIP vision checkpoint (``vision_model.*``), as the LLaVA code base holds it."""
    rest = key[len("model.vision_tower."):]
    return rest if rest.startswith("vision_model.") else "vision_model." + rest


def _write_original(model, folder, text: str, projector: str, *, shards: int = 2, with_vision: bool = True,
                    extra: dict | None = None):
    """The reference's weights under the original LLaVA code base's names, in ``shards`` files + index."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in model.state_dict().items():
        if key.startswith("model.language_model."):
            new = "model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            if not with_vision:
                continue
            new = "model.vision_tower.vision_tower." + _clip_name(key)
        elif key.startswith("model.multi_modal_projector."):
            layer, what = key.rsplit(".", 2)[-2:]
            new = f"model.mm_projector.{what}" if projector == "linear" else \
                f"model.mm_projector.{0 if layer == 'linear_1' else 2}.{what}"
        else:
            new = key
        if new in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[:VOCAB]
        tensors[new] = t.clone().contiguous()
    tensors.update(extra or {})
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tower = folder / "clip-tiny"
    tower.mkdir(exist_ok=True)
    (tower / "config.json").write_text(json.dumps(VISION))
    config = dict(TEXT[text], model_type="llava_mistral" if text == "mistral" else "llava", vocab_size=VOCAB,
                  mm_projector_type="mlp2x_gelu" if projector == "mlp" else "linear", mm_hidden_size=32,
                  mm_vision_tower=str(tower), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  architectures=["LlavaMistralForCausalLM" if text == "mistral" else "LlavaLlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    _original_tokenizer(folder)
    return folder


def _logits(model, image_tokens: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, image_tokens), VOCAB), torch.randint(3, VOCAB, (1, 7), generator=g)], 1)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, use_cache=False).logits


@pytest.mark.parametrize("text,projector", [("mistral", "mlp"), ("llama", "linear")])
def test_converted_checkpoint_computes_the_references_logits(tmp_path, text, projector):
    reference = _reference(text, projector)
    src = _write_original(reference, tmp_path / "original", text, projector)
    summary = convert_llava(src, tmp_path / "converted", shard_size=20_000)  # small shards: several files
    assert summary["vocab"] == 320 and summary["image_token_id"] == VOCAB and len(summary["shards"]) > 1
    assert not list((tmp_path / "converted").glob("*.bin"))
    converted = llava.load(tmp_path / "converted")  # strict: every weight present and of the right shape
    assert converted.image_token_id == VOCAB and converted.tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    assert converted.pad_id == 301
    # LLaVA v1's linear projector is written as transformers' own projector (identity act, identity linear_2)
    assert type(converted.model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    expected = _logits(reference, 16)
    got = _logits(converted.model.eval(), 16)
    assert got.shape == expected.shape == (1, 24, 320)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_tower_loaded_separately_comes_from_vision_tower(tmp_path):
    reference = _reference("mistral", "mlp")
    src = _write_original(reference, tmp_path / "original", "mistral", "mlp", with_vision=False)
    with pytest.raises(ConversionError, match="no vision tower weights.*--vision-tower"):
        convert_llava(src, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()  # refused before anything was written
    clip = tmp_path / "clip"
    clip.mkdir()
    state = {_clip_name(k): v.contiguous() for k, v in reference.state_dict().items()
             if k.startswith("model.vision_tower.")}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)  # a full CLIP's text side is skipped
    save_file(state, str(clip / "model.safetensors"))
    (clip / "config.json").write_text(json.dumps({"vision_config": VISION}))
    convert_llava(src, tmp_path / "converted", vision_tower=clip)
    converted = llava.load(tmp_path / "converted")
    torch.testing.assert_close(_logits(converted.model.eval(), 16), _logits(reference, 16), rtol=0, atol=1e-5)


def test_unknown_keys_pickles_and_a_full_output_are_refused(tmp_path):
    reference = _reference("mistral", "mlp")
    src = _write_original(reference, tmp_path / "original", "mistral", "mlp",
                          extra={"model.mm_resampler.weight": torch.zeros(2, 2)})
    with pytest.raises(ConversionError, match=r"model\.mm_resampler\.weight.*nothing was written"):
        convert_llava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PeftmedError, match="pickled weights.*safetensors only"):
        convert_llava(pickled, tmp_path / "out2")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_llava(src, busy)
    assert (busy / "notes.txt").read_text() == "mine"


def test_a_mismatched_checkpoint_is_named_on_load(tmp_path):
    """A converted folder whose weights do not fit its config: the loader names the key and both shapes."""
    reference = _reference("mistral", "mlp")
    src = _write_original(reference, tmp_path / "original", "mistral", "mlp")
    dst = tmp_path / "converted"
    convert_llava(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(PeftmedError, match=r"shape-mismatched.*mlp"):
        llava.load(dst)


def test_the_command_line(tmp_path):
    reference = _reference("llama", "linear")
    src = _write_original(reference, tmp_path / "original", "llama", "linear", shards=1)
    run = lambda *a: subprocess.run([sys.executable, "-m", "peftmed", "convert", *a], capture_output=True, text=True,
                                    env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    ok = run("llava-med", str(src), str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "linear projector" in ok.stdout and "300 -> 320" in ok.stdout
    again = run("llava-med", str(src), str(tmp_path / "out"))
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
    bad = run("llava-med", str(tmp_path / "nowhere"), str(tmp_path / "out3"))
    assert bad.returncode != 0 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
