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


# ---- the source is never touched; damaged checkpoints are named, never tracebacks ----------------------
def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "peftmed", "convert", *map(str, args)], capture_output=True,
                          text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_the_reference_is_drawn_from_its_seed():
    """LLaVA v1's linear projector used to be drawn from the global random state after the seeded build."""
    a, b = _reference("llama", "linear"), _reference("llama", "linear")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return _write_original(_reference("llama", "linear"), root / "original", "llama", "linear")


@pytest.mark.parametrize("dst", ["{src}", "{src}/.", "{src}/sub/out", "{parent}"])
def test_an_output_that_is_contains_or_lies_inside_the_source_is_refused_untouched(original, tmp_path, dst):
    """`peftmed convert llava-med SRC SRC --overwrite` used to delete the source's shards and index first."""
    import shutil

    src = tmp_path / "ckpt" / "original"
    shutil.copytree(original, src)
    before = _files(tmp_path / "ckpt")
    r = _cli("llava-med", src, dst.format(src=src, parent=tmp_path / "ckpt"), "--overwrite")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "SRC" in r.stderr and ("is SRC" in r.stderr or "inside" in r.stderr or "contains" in r.stderr), r.stderr
    assert _files(tmp_path / "ckpt") == before  # not one byte of the source changed


def test_overwrite_replaces_only_what_a_conversion_wrote(original, tmp_path):
    dst = tmp_path / "out"
    assert convert_llava(original, dst)["shards"] == ["model.safetensors"]
    (dst / "notes.txt").write_text("mine")
    convert_llava(original, dst, overwrite=True, shard_size=20_000)  # several shards replace the single file
    assert (dst / "notes.txt").read_text() == "mine" and not (dst / "model.safetensors").exists()
    llava.load(dst)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"mine": true}')  # a user's file of a name the converter writes
    with pytest.raises(ConversionError, match="config.json.*no earlier conversion wrote"):
        convert_llava(original, other, overwrite=True)
    assert json.loads((other / "config.json").read_text()) == {"mine": True}
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]  # nothing left behind


def _damage(original, tmp_path, how):
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(original, src)
    index = src / "model.safetensors.index.json"
    shard = sorted(src.glob("model-*.safetensors"))[0]
    config = json.loads((src / "config.json").read_text())
    if how == "half a shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "garbage index":
        index.write_text("{not json")
    elif how == "index naming /etc/passwd":
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = "/etc/passwd"
        index.write_text(json.dumps(data))
    elif how == "index leaving the folder":
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = "../original/" + shard.name
        index.write_text(json.dumps(data))
    elif how == "config of wrong types":
        config["hidden_size"] = "thirty-two"
        (src / "config.json").write_text(json.dumps(config))
    elif how == "config is a list":
        (src / "config.json").write_text("[1, 2]")
    elif how == "garbage tokenizer":
        (src / "tokenizer.json").write_text('{"model": 12}')
    elif how == "ten million layers":
        config["num_hidden_layers"] = 10_000_000
        (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("how, needle", [
    ("half a shard", "not a complete safetensors file"),
    ("garbage index", "is not valid JSON"),
    ("index naming /etc/passwd", "'/etc/passwd', which is not a file name inside"),
    ("index leaving the folder", "which is not a file name inside"),
    ("config of wrong types", "hidden_size must be a whole number >= 1, got 'thirty-two'"),
    ("config is a list", "must hold a JSON object"),
    ("garbage tokenizer", "tokenizer.json"),
    ("ten million layers", "num_hidden_layers 10000000, the weights hold 2 layers"),
])
def test_a_damaged_checkpoint_is_named_before_anything_is_built(original, tmp_path, how, needle):
    import time

    src = _damage(original, tmp_path, how)
    t0 = time.perf_counter()
    r = _cli("llava-med", src, tmp_path / "out")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr[-2000:]
    assert time.perf_counter() - t0 < 60  # a config of 10 million layers once ran 269 s into a MemoryError
    assert not (tmp_path / "out").exists()


def test_a_converted_llava_v1_loads_correctly_in_plain_transformers(original, tmp_path):
    """LLaVA v1's single linear projector: plain from_pretrained used to build the two-layer projector and leave
    its second layer to a random init (logits off by 0.57). Loaded here in a process that never imports peftmed."""
    dst = tmp_path / "out"
    convert_llava(original, dst)
    reference = _reference("llama", "linear")
    ids = [[1] + [VOCAB] * 16 + [5, 6, 7]]
    code = ("import json, sys, torch\n"
            "from transformers import LlavaForConditionalGeneration\n"
            "m = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
            "g = torch.Generator().manual_seed(0)\n"
            "pixels = torch.randn(1, 3, 32, 32, generator=g)\n"
            "with torch.no_grad():\n"
            "    out = m(input_ids=torch.tensor(json.loads(sys.argv[2])), pixel_values=pixels).logits\n"
            "assert 'peftmed' not in sys.modules\n"
            "print(json.dumps(out.flatten().tolist()))\n")
    r = subprocess.run([sys.executable, "-c", code, str(dst), json.dumps(ids)], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), pixel_values=pixels).logits.flatten()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_position_ids_buffer_in_the_tower_is_accepted(tmp_path):
    """CLIP checkpoints saved before transformers 4.31 carry `embeddings.position_ids`: a buffer, not a weight."""
    reference = _reference("mistral", "mlp")
    positions = torch.arange(17).unsqueeze(0)
    src = _write_original(reference, tmp_path / "original", "mistral", "mlp", extra={
        "model.vision_tower.vision_tower.vision_model.embeddings.position_ids": positions})
    convert_llava(src, tmp_path / "out")
    converted = llava.load(tmp_path / "out")
    torch.testing.assert_close(_logits(converted.model.eval(), 16), _logits(reference, 16), rtol=0, atol=1e-5)
