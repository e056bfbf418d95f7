"""phantom: determinism, disjoint splits, answers that agree with the planted findings, and real signal."""

import numpy as np
import pytest
import torch
from torch import nn

from peftmed.data import VQADataset, load_records, majority_baseline
from peftmed.errors import ConfigError
from peftmed.metrics import vqa_scores


def _pixels(records):
    return [np.asarray(r.load_image()) for r in records]


def test_same_seed_same_pixels_and_questions_other_seed_differs():
    a = load_records("phantom", "train", n_images=6, seed=3)
    b = load_records("phantom", "train", n_images=6, seed=3)
    c = load_records("phantom", "train", n_images=6, seed=4)
    strip = lambda rs: [(r.qid, r.question, r.answer, r.answer_type, r.extra["report"]) for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    assert strip(a) != strip(c)
    assert not np.array_equal(_pixels(a)[0], _pixels(c)[0])


def test_splits_have_disjoint_images_and_qids():
    train = load_records("phantom", "train", n_images=20)
    test = load_records("phantom", "test", n_images=20)
    assert not {r.image_id for r in train} & {r.image_id for r in test}
    assert not {r.qid for r in train} & {r.qid for r in test}
    train_px = {p.tobytes() for p in _pixels(train)}
    assert not any(p.tobytes() in train_px for p in _pixels(test))


def test_options_and_answers_agree_with_findings():
    recs = load_records("phantom", "test", n_images=40, questions_per_image=6, image_size=32, domain="mr")
    assert len(recs) == 240 and {r.answer_type for r in recs} == {"CLOSED", "OPEN"}
    assert np.asarray(recs[0].load_image()).shape == (32, 32, 3)
    for r in recs:
        f = r.extra["findings"]
        assert f["modality"] in ("t1 mri", "t2 mri") and r.organ == f["region"]
        if r.question == "How many lesions are there?":
            assert r.answer == str(len(f["lesions"]))
            assert r.extra["report"].startswith("Technique:") and "Impression:" in r.extra["report"]
        if r.question == "Is there an abnormality in this image?":
            assert r.answer == ("yes" if f["lesions"] else "no")
        if r.question == "How large is the lesion?":
            assert r.answer == f["lesions"][0]["size_class"] and f"{f['lesions'][0]['size_cm']:.1f} cm" in r.extra["report"]
    closed = [r.answer for r in recs if r.answer_type == "CLOSED"]
    assert 0.3 < closed.count("yes") / len(closed) < 0.7  # yes/no balanced enough to need the image


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="'xray'"):
        load_records("phantom", "train", domain="xray")
    with pytest.raises(ConfigError, match="n_images .* -5"):
        load_records("phantom", "train", n_images=-5)




def test_a_small_model_beats_the_majority_answer_by_a_wide_margin(one_thread):
    """Closed modality and body-part questions, answered from 16x16 pixels by logistic regression."""
    torch.manual_seed(0)
    regions = ("head", "chest", "abdomen")

    def data(split, n):
        recs = [r for r in load_records("phantom", split, n_images=n, questions_per_image=6, image_size=32)
                if r.answer_type == "CLOSED" and r.question_type in ("MODALITY", "ORGAN")]
        ds = VQADataset(recs, image_size=16)
        first = {}  # one row per image: the classifier predicts image-level labels
        for i, r in enumerate(recs):
            first.setdefault(r.image_id, i)
        x = torch.stack([ds[i]["image"][0] for i in first.values()]).flatten(1).float() / 255  # (N, 256)
        f = [recs[i].extra["findings"] for i in first.values()]
        y = torch.tensor([[z["modality"] == "contrast ct", regions.index(z["region"])] for z in f])
        return recs, list(first), x, y

    train, _, xtr, ytr = data("train", 240)
    test, test_images, xte, _ = data("test", 80)
    net = nn.Linear(xtr.shape[1], 2 + 3)
    opt = torch.optim.Adam(net.parameters(), 3e-2)
    for _ in range(300):
        out = net(xtr)
        loss = nn.functional.cross_entropy(out[:, :2], ytr[:, 0]) + nn.functional.cross_entropy(out[:, 2:], ytr[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(xte)
    row = {image_id: i for i, image_id in enumerate(test_images)}
    preds = {}
    for r in test:  # the image-level prediction answers the question's yes/no
        i = row[r.image_id]
        if r.question_type == "MODALITY":
            asked = r.question.removeprefix("Is this a ").removesuffix(" image?")
            seen = "contrast ct" if out[i, :2].argmax() == 1 else "non-contrast ct"
        else:
            asked = r.question.removeprefix("Is this an image of the ").removesuffix("?")
            seen = regions[out[i, 2:].argmax()]
        preds[r.qid] = "yes" if asked == seen else "no"
    model_acc = vqa_scores(preds, test)["acc_closed"]
    majority_acc = vqa_scores(majority_baseline(train, test), test)["acc_closed"]
    assert model_acc >= majority_acc + 0.3, (model_acc, majority_acc)
