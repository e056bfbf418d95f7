"""MISS checkpoints in BLIP key format: round trip, the strict load report (missing, unexpected,
shape mismatch, foreign architecture), position-embedding interpolation, bad model folders."""

import json

import pytest
import torch

import peftmed
from peftmed.backbones.miss.checkpoint import (
    CheckpointError,
    from_pretrained,
    interpolate_pos_embed,
    load_blip_state_dict,
    save_pretrained,
    to_blip_state_dict,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return peftmed.build_backbone("miss-tiny", **options).eval()


@pytest.fixture(scope="module")
def source():
    return tiny(seed=0)


def fresh_like(model, seed=1):
    """A differently initialised model with the same tokenizer (what loading must overwrite)."""
    return tiny(seed=seed, tokenizer=model.tokenizer)


def test_blip_keys_fuse_qkv_and_alias_the_lm_head(source):
    state = to_blip_state_dict(source)
    d = source.config.vision_width
    assert state["visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert "visual_encoder.blocks.0.attn.q.weight" not in state
    assert "text_encoder.encoder.layer.0.crossattention.self.query.weight" in state
    assert torch.equal(state["text_decoder.cls.predictions.bias"], state["text_decoder.cls.predictions.decoder.bias"])
    assert torch.equal(state["text_decoder.cls.predictions.decoder.weight"],
                       state["text_decoder.bert.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("weights", ["safetensors", "pth"])
def test_round_trip_gives_identical_outputs(source, tmp_path, weights, capsys):
    save_pretrained(source, tmp_path, weights=weights)
    loaded = peftmed.get_backbone("miss-tiny").from_pretrained(tmp_path).eval()
    assert "status: ok" in capsys.readouterr().out  # the report is printed
    assert loaded.peftmed_backbone == "miss-tiny"
    batch = source.example_batch(3)
    with torch.no_grad():
        assert torch.equal(loaded.compute_loss(batch), source.compute_loss(batch))
    assert loaded.generate(batch) == source.generate(batch)
    assert loaded.text_decoder.cls.predictions.decoder.weight is loaded.text_decoder.bert.embeddings.word_embeddings.weight


def test_bare_pth_without_config_infers_the_sizes(source, tmp_path):
    torch.save({"model": to_blip_state_dict(source)}, tmp_path / "model_base_vqa.pth")
    source.tokenizer.save(tmp_path)
    guessed = from_pretrained(tmp_path, verbose=False)
    assert guessed.config.text_heads == 1  # head counts are not in the tensors: 64-wide heads assumed (BERT/ViT)
    loaded = from_pretrained(tmp_path, verbose=False, vision_heads=2, text_heads=2).eval()
    for field in ("image_size", "vision_width", "vision_layers", "text_layers", "intermediate_size", "vocab_size"):
        assert getattr(loaded.config, field) == getattr(source.config, field), field
    batch = source.example_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.compute_loss(batch), source.compute_loss(batch))


def test_report_lists_missing_unexpected_and_mismatched_and_strict_raises(source):
    state = to_blip_state_dict(source)
    del state["text_encoder.encoder.layer.1.output.dense.weight"]
    state["text_encoder.pooler.dense.weight"] = torch.zeros(4, 4)
    state["text_decoder.bert.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(7)
    target = fresh_like(source)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_blip_state_dict(target, state, verbose=False)
    report = info.value.report
    assert report.missing == ["text_encoder.encoder.layer.1.output.dense.weight"]
    assert report.unexpected == ["text_encoder.pooler.dense.weight"]
    assert [m[0] for m in report.mismatched] == ["text_decoder.bert.encoder.layer.0.intermediate.dense.bias"]
    assert "pooler" in str(info.value) and "shape mismatch" in str(info.value)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # strict: nothing copied
    # non-strict loads what fits and still reports the rest
    report = load_blip_state_dict(target, state, strict=False, verbose=False)
    assert not report.ok and report.missing and report.unexpected and report.mismatched
    assert torch.equal(target.text_encoder.encoder.layer[0].output.dense.weight,
                       source.text_encoder.encoder.layer[0].output.dense.weight)
    assert not torch.equal(target.text_encoder.encoder.layer[1].output.dense.weight,
                           source.text_encoder.encoder.layer[1].output.dense.weight)


def test_checkpoint_of_another_architecture_is_reported_as_such(source):
    hf_blip = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 16, 16),
               "text_encoder.embeddings.token_type_embeddings.weight": torch.zeros(2, 8)}
    with pytest.raises(CheckpointError, match="not a BLIP/MISS checkpoint") as info:
        load_blip_state_dict(fresh_like(source), hf_blip, strict=False, verbose=False)
    assert "BlipForQuestionAnswering" in str(info.value)
    with pytest.raises(CheckpointError, match="unknown architecture.*encoder"):
        load_blip_state_dict(fresh_like(source), {"encoder.weight": torch.zeros(2)}, verbose=False)


def test_pos_embed_interpolation_keeps_cls_and_smooth_grids():
    grid = torch.linspace(0, 1, 4)
    ramp = (grid[:, None] + 2 * grid[None, :]).reshape(1, 16, 1).expand(1, 16, 3)  # smooth field on a 4x4 grid
    pos = torch.cat([torch.full((1, 1, 3), 9.0), ramp], dim=1)
    out = interpolate_pos_embed(pos, 64)
    assert out.shape == (1, 65, 3)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS kept
    assert torch.equal(interpolate_pos_embed(pos, 16), pos)  # same grid: unchanged
    const = torch.cat([pos[:, :1], torch.full((1, 16, 3), 0.5)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(const, 36)[:, 1:], torch.full((1, 36, 3), 0.5))
    field = out[0, 1:, 0].view(8, 8)
    assert (field[:, 1:] > field[:, :-1]).all() and (field[1:, :] > field[:-1, :]).all()  # still increasing
    with pytest.raises(CheckpointError, match="square"):
        interpolate_pos_embed(pos, 50)


def test_loading_at_another_image_size_interpolates_and_runs(source, tmp_path, capsys):
    save_pretrained(source, tmp_path)
    bigger = from_pretrained(tmp_path, image_size=96).eval()
    assert "interpolated visual_encoder.pos_embed" in capsys.readouterr().out
    assert bigger.image_size == 96 and bigger.visual_encoder.pos_embed.shape[1] == 37
    batch = bigger.example_batch(2)
    assert len(bigger.generate(batch, num_beams=1, max_new_tokens=3)) == 2
    assert torch.equal(bigger.visual_encoder.pos_embed[:, 0], source.visual_encoder.pos_embed[:, 0])


def test_empty_or_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        peftmed.get_backbone("miss").from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is empty"):
        peftmed.get_backbone("miss").from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "miss"}))
    with pytest.raises(CheckpointError, match="no weights"):
        peftmed.get_backbone("miss").from_pretrained(tmp_path)


def test_tokenizer_that_does_not_match_the_checkpoint_vocabulary_is_refused(source, tmp_path):
    save_pretrained(source, tmp_path)
    other = tiny(seed=0, texts=["only a few words here"] * 3, vocab_size=None)
    assert len(other.tokenizer) != source.config.vocab_size
    other.tokenizer.save(tmp_path)  # overwrite with a different vocabulary
    with pytest.raises(peftmed.ConfigError, match=rf"tokenizer has {len(other.tokenizer)} tokens.*{source.config.vocab_size} rows"):
        from_pretrained(tmp_path)


def test_config_of_another_model_type_is_refused(source, tmp_path):
    save_pretrained(source, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="'llava' model"):
        from_pretrained(tmp_path)


def test_saving_a_model_with_adapter_layers_is_refused(source, tmp_path):
    pm = peftmed.apply(tiny(), "fusion=lora(r=2)")
    with pytest.raises(CheckpointError, match="merge_and_unload"):
        save_pretrained(pm.base_model, tmp_path)
    merged = pm.merge_and_unload()
    assert save_pretrained(merged, tmp_path / "merged").is_dir()
