"""MISS inputs: image checks and normalisation (one division by 255), the WordPiece tokenizer
(train / save / load exactly, BERT vocab files with BLIP's [DEC]/[ENC]), vocabulary mismatches."""

import pytest
import torch

import peftmed
from peftmed.backbones.images import check_images, normalize_images, resize_images
from peftmed.backbones.miss.tokenizer import SPECIAL_TOKENS, MissTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return peftmed.build_backbone("miss-tiny").eval()


def test_normalisation_divides_by_255_once():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    x = normalize_images(images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(x[0, :, 0, 0], torch.full((3,), -2.0))  # (0 - 0.5) / 0.25
    torch.testing.assert_close(x[0, :, 0, 1], torch.full((3,), 2.0))  # (1 - 0.5) / 0.25


def test_grayscale_is_repeated_to_three_channels(model):
    batch = model.example_batch(2)
    gray = batch["images"][:, :1]
    as_rgb = dict(batch, images=gray.repeat(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model.compute_loss(dict(batch, images=gray)), model.compute_loss(as_rgb))


@pytest.mark.parametrize("shape, dtype, match", [
    ((2, 3, 32, 32), torch.uint8, r"\(2, 3, 32, 32\).*64 x 64"),
    ((2, 4, 64, 64), torch.uint8, r"4 channels; expected 3"),
    ((3, 64, 64), torch.uint8, r"expected a batch"),
    ((2, 3, 64, 64), torch.float32, r"dtype torch.float32; expected uint8"),
])
def test_bad_images_raise_naming_shape_and_expectation(model, shape, dtype, match):
    batch = model.example_batch(2)
    batch["images"] = torch.zeros(shape, dtype=dtype)
    with pytest.raises(peftmed.ShapeError, match=match):
        model.compute_loss(batch)


def test_resize_gives_a_valid_batch():
    images = torch.randint(0, 256, (2, 3, 100, 80), dtype=torch.uint8)
    out = resize_images(images, 64)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 64, 64)
    check_images(out, 64)
    flat = torch.full((1, 3, 100, 80), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 64), torch.full((1, 3, 64, 64), 77, dtype=torch.uint8))


TEXTS = ["is the lesion hyperdense? yes", "which lobe contains the nodule? right middle lobe",
         "is there a pneumoperitoneum? no", "what modality is this? mri flair"]


def test_trained_tokenizer_saves_and_loads_exactly(tmp_path):
    tok = MissTokenizer.train(TEXTS, vocab_size=200)
    tok.save(tmp_path)
    again = MissTokenizer.load(tmp_path)
    assert again.backend.get_vocab() == tok.backend.get_vocab()
    probe = TEXTS + ["An unseen Question about the PNEUMOTHORAX?"]
    assert torch.equal(again.encode(probe, 35)[0], tok.encode(probe, 35)[0])
    assert [again.enc_id, again.dec_id, again.sep_id, again.pad_id] == [tok.enc_id, tok.dec_id, tok.sep_id, tok.pad_id]
    # vocab.txt alone (BERT format) restores the same ids too
    (tmp_path / "tokenizer.json").unlink()
    from_txt = MissTokenizer.load(tmp_path)
    assert torch.equal(from_txt.encode(probe, 35)[0], tok.encode(probe, 35)[0])


def test_bert_vocab_file_gets_blips_dec_and_enc_at_the_end(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "mass", "##es", "?", "yes", "no"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = MissTokenizer.from_vocab_file(tmp_path / "vocab.txt")
    assert len(tok) == len(words) + 2 and (tok.dec_id, tok.enc_id) == (len(words), len(words) + 1)
    ids, mask, cut = tok.encode(["Is there a mass?"], 35, first=tok.enc_id)
    assert ids[0].tolist() == [tok.enc_id, 5, 6, 7, 8, 10, tok.sep_id] and cut == 0
    assert tok.decode(ids[0, 1:].tolist()) == "is there a mass?"


def test_encode_truncates_keeping_sep_and_counts():
    tok = MissTokenizer.train(TEXTS, vocab_size=200)
    ids, mask, cut = tok.encode(["yes " * 50, "no"], 10, first=tok.enc_id)
    assert cut == 1 and ids.shape == (2, 10)
    assert ids[0, -1] == tok.sep_id and ids[0, 0] == tok.enc_id
    assert mask[1].tolist() == [True] * 3 + [False] * 7


def test_tokenizer_larger_than_the_embeddings_is_refused_before_training():
    big = MissTokenizer.train(TEXTS * 5, vocab_size=400)
    with pytest.raises(peftmed.ConfigError, match=rf"{len(big)} tokens but the model's vocab_size is 50"):
        peftmed.build_backbone("miss-tiny", tokenizer=big, vocab_size=50)


def test_tiny_vocabulary_is_trained_on_the_texts_given():
    model = peftmed.build_backbone("miss-tiny", texts=TEXTS * 3, device="meta")
    assert model.config.vocab_size == len(model.tokenizer)
    assert model.tokenizer.tokenize("pneumoperitoneum")[0] != "[UNK]"
    assert all(model.tokenizer.backend.token_to_id(t) is not None for t in SPECIAL_TOKENS)


def test_trained_vocabulary_is_the_same_every_time():
    """A model rebuilt from the same text must get the same token ids as the one an adapter was saved from."""
    from peftmed.backbones.miss.tokenizer import MissTokenizer

    texts = ["is there a lesion in the left lung?", "yes", "what organ is shown?", "liver", "no"] * 3
    vocabs = [MissTokenizer.train(texts, vocab_size=200).backend.get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs[1:])
