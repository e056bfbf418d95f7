"""Every VQA-RAD answer (train and test), encoded and decoded by each backbone's tokenizer the way its model
generates, normalises to itself: an answer a model can produce can always be matched."""

import pytest

import peftmed
from peftmed.data import load_records, normalize_answer


@pytest.fixture(scope="module")
def answers(vqa_rad_dir):
    train, test = (load_records("vqa-rad", split, data_dir=vqa_rad_dir) for split in ("train", "test"))
    texts = [r.question for r in train] + [r.answer for r in train]
    return sorted({r.answer for r in train + test}), texts


def _unmatched(answers, decode):
    return [(a, decode(a)) for a in answers if normalize_answer(decode(a)) != normalize_answer(a)]


def test_miss_decoding_round_trips_every_answer(answers):
    answers, texts = answers
    tok = peftmed.build_backbone("miss-tiny", texts=texts, device="meta").tokenizer

    def decode(a):
        ids, _, _ = tok.encode([a], 128, first=tok.dec_id)
        return tok.decode(ids[0].tolist()[1:])

    assert _unmatched(answers, decode) == []
    assert decode("Chest X-ray") == "chest x-ray" and decode("3.4 cm") == "3.4 cm"


def test_blip_decoding_round_trips_every_answer(answers):
    from peftmed.data.text import detokenize

    answers, texts = answers
    tok = peftmed.build_backbone("hf-blip-vqa", texts=texts).tokenizer

    def decode(a):  # what HFBlipVQA.generate does with the generated ids
        ids = tok(a, add_special_tokens=False)["input_ids"]
        return detokenize(tok.decode(ids, skip_special_tokens=True))

    assert _unmatched(answers, decode) == []


def test_llava_decoding_round_trips_every_answer(answers):
    answers, texts = answers
    tok = peftmed.build_backbone("hf-llava", texts=texts).tokenizer

    def decode(a):  # HFLlava trains on " " + answer and decodes the generated ids, stripped
        ids = tok(" " + a.strip(), add_special_tokens=False)["input_ids"]
        return tok.decode(ids, skip_special_tokens=True).strip()

    assert _unmatched(answers, decode) == []


@pytest.mark.parametrize("a, b", [("x-ray", "X - ray"), ("3.4 cm", "3. 4 cm"), ("(DWI)", "( dwi )"),
                                  ("patient's left", "patient ' s left"), ("jaundice,weight", "jaundice, weight")])
def test_spacing_around_inner_punctuation_does_not_change_an_answer(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("left", "right"), ("t1", "t2"), ("x-ray", "xray ct")])
def test_different_answers_stay_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)
