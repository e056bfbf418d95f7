"""miss-tiny on real VQA-RAD records: a WordPiece vocabulary trained on the training questions and
answers covers the test questions, and real radiographs (any size, grayscale JPEGs) go through
load_image into a training step and generation. Skips when ../shared/data/vqa_rad is absent."""

import json

import pytest
import torch

import peftmed
from peftmed.backbones.images import load_image
from peftmed.backbones.miss.tokenizer import MissTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def records(folder, name):
    return json.loads((folder / name).read_text())


def test_vocabulary_trained_on_train_split_covers_the_test_questions(vqa_rad_dir):
    train = records(vqa_rad_dir, "trainset.json")
    test = records(vqa_rad_dir, "testset.json")
    tok = MissTokenizer.train([r["question"] for r in train] + [str(r["answer"]) for r in train], vocab_size=3000)
    assert len(tok) <= 3000
    pieces = [p for r in test for p in tok.tokenize(r["question"])]
    unknown = sum(p == "[UNK]" for p in pieces)
    assert unknown / len(pieces) < 0.01, f"{unknown} of {len(pieces)} test-question tokens are [UNK]"


def test_real_images_train_and_answer(vqa_rad_dir):
    train = records(vqa_rad_dir, "trainset.json")[:4]
    torch.manual_seed(0)
    model = peftmed.build_backbone("miss-tiny", texts=[r["question"] for r in train] + [r["answer"] for r in train])
    images = torch.stack([load_image(vqa_rad_dir / "images" / r["image_name"], model.image_size) for r in train])
    assert images.shape == (4, 3, model.image_size, model.image_size) and images.dtype == torch.uint8
    batch = {"images": images, "questions": [r["question"] for r in train],
             "answers": [str(r["answer"]) for r in train], "qids": [r["qid"] for r in train]}
    loss = model.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    answers = model.eval().generate(batch, num_beams=3)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
