"""slake loader on a small fixture in the official layout (tiny PNGs written by the test)."""

import json

import pytest
from PIL import Image

from peftmed.data import DataError, VQADataset, load_records
from peftmed.errors import ConfigError, UnknownNameError


def _write_slake(root, rows_by_split):
    (root / "imgs" / "xmlab1").mkdir(parents=True)
    (root / "imgs" / "xmlab2").mkdir(parents=True)
    Image.new("RGB", (20, 12), (200, 10, 10)).save(root / "imgs" / "xmlab1" / "source.png")
    Image.new("L", (8, 8), 90).save(root / "imgs" / "xmlab2" / "source.png")
    for split, rows in rows_by_split.items():
        (root / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False))


def _row(qid, img, lang="en", **kw):
    return {"img_id": 1, "img_name": img, "question": f"Q{qid}?", "answer": "Yes", "q_lang": lang,
            "location": "Lung", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
            "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": qid, **kw}


@pytest.fixture
def slake_dir(tmp_path):
    _write_slake(tmp_path, {
        "train": [_row(0, "xmlab1/source.png"), _row(1, "xmlab1/source.png", lang="zh", question="肺?"),
                  _row(2, "xmlab2/source.png", answer="Left Lung", answer_type="OPEN", content_type="Position")],
        "validate": [_row(10, "xmlab2/source.png")],
        "test": [_row(20, "xmlab1/source.png", lang="zh")],
    })
    return tmp_path


def test_english_by_default_with_fields_mapped(slake_dir):
    train = load_records("slake", "train", data_dir=slake_dir)
    assert [r.qid for r in train] == ["0", "2"]
    open_q = train[1]
    assert (open_q.answer, open_q.answer_type, open_q.question_type, open_q.organ, open_q.image_id) == (
        "Left Lung", "OPEN", "Position", "Lung", "xmlab2/source.png")
    assert open_q.extra["modality"] == "CT"
    assert [r.qid for r in load_records("slake", "train", data_dir=slake_dir, lang="all")] == ["0", "1", "2"]
    assert len(load_records("slake", "validate", data_dir=slake_dir)) == 1


def test_images_load_through_the_dataset(slake_dir):
    ds = VQADataset(load_records("slake", "train", data_dir=slake_dir), image_size=16)
    first, second = ds[0]["image"], ds[1]["image"]
    assert first.shape == second.shape == (3, 16, 16)  # a grey PNG comes back as RGB
    assert first[0].float().mean() > 150 and first[1].float().mean() < 60  # red stays red


def test_bad_inputs(slake_dir):
    with pytest.raises(DataError, match="'test' of dataset 'slake' is empty"):
        load_records("slake", "test", data_dir=slake_dir)  # only a Chinese question there
    with pytest.raises(ConfigError, match="'fr'"):
        load_records("slake", "train", data_dir=slake_dir, lang="fr")
    with pytest.raises(UnknownNameError, match="validate"):
        load_records("slake", "val", data_dir=slake_dir)
    rows = json.loads((slake_dir / "train.json").read_text())
    rows[1]["answer_type"] = "MAYBE"
    rows[1]["q_lang"] = "en"
    (slake_dir / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"train\.json: record 1: .*'MAYBE'"):
        load_records("slake", "train", data_dir=slake_dir)
