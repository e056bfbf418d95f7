"""vqa-rad loader on the real data (skipped when ../shared/data/vqa_rad is absent) and on broken copies."""

import json
import shutil
from collections import Counter

import pytest

from peftmed.data import DataError, MissingDataError, load_records

OFFICIAL = "VQA_RAD Dataset Public.json"


def test_split_counts_and_fields(vqa_rad_dir):
    train = load_records("vqa-rad", "train", data_dir=vqa_rad_dir)
    test = load_records("vqa-rad", "test", data_dir=vqa_rad_dir)
    assert (len(train), len(test)) == (1798, 450)
    assert Counter(r.answer_type for r in test) == {"CLOSED": 265, "OPEN": 185}
    assert not {r.qid for r in train} & {r.qid for r in test}
    rec = next(r for r in test if r.qid == "680")  # testset.json's first record
    assert (rec.question, rec.answer, rec.image_id, rec.organ) == (
        "Is this a hepatic mass?", "yes", "synpic40596.jpg", "ABD")
    # fields only the official release has are merged in by qid
    assert rec.extra["question_rephrase"] == "Is this mass located in the liver?"
    assert {r.organ for r in train} == {"HEAD", "CHEST", "ABD"}


def test_all_split_is_the_official_release(vqa_rad_dir):
    records = load_records("vqa-rad", "all", data_dir=vqa_rad_dir)
    assert len(records) == 2248
    assert all(r.answer_type in ("CLOSED", "OPEN") for r in records)  # "CLOSED " is normalised


def _small_copy(src, dst, n=6):
    """A VQA-RAD folder with the first n train questions and only their images."""
    train = json.loads((src / "trainset.json").read_text())[:n]
    qids = {r["qid"] for r in train}
    official = [r for r in json.loads((src / OFFICIAL).read_text()) if int(r["qid"]) in qids]
    (dst / "images").mkdir(parents=True)
    for r in train:
        shutil.copy(src / "images" / r["image_name"], dst / "images" / r["image_name"])
    (dst / "trainset.json").write_text(json.dumps(train))
    (dst / OFFICIAL).write_text(json.dumps(official))
    return train


def test_missing_image_names_qid_and_path_and_can_be_skipped(vqa_rad_dir, tmp_path, caplog):
    train = _small_copy(vqa_rad_dir, tmp_path)
    gone = train[2]
    others_same_image = [r for r in train if r["image_name"] == gone["image_name"]]
    (tmp_path / "images" / gone["image_name"]).unlink()
    with pytest.raises(MissingDataError) as err:
        load_records("vqa-rad", "train", data_dir=tmp_path)
    assert gone["image_name"] in str(err.value) and "skip_missing" in str(err.value)
    assert repr(str(others_same_image[0]["qid"])) in str(err.value)
    kept = load_records("vqa-rad", "train", data_dir=tmp_path, skip_missing=True)
    assert len(kept) == len(train) - len(others_same_image)
    assert "skipped" in caplog.text


def test_missing_data_dir_names_the_path(tmp_path):
    with pytest.raises(MissingDataError, match="nowhere"):
        load_records("vqa-rad", "train", data_dir=tmp_path / "nowhere")
    with pytest.raises(MissingDataError, match="data-dir"):
        load_records("vqa-rad", "train")


def test_malformed_record_names_file_and_index(vqa_rad_dir, tmp_path):
    train = _small_copy(vqa_rad_dir, tmp_path)
    train[3]["question"] = ["not", "text"]
    (tmp_path / "trainset.json").write_text(json.dumps(train))
    with pytest.raises(DataError, match=r"trainset\.json: record 3 field 'question' is \['not', 'text'\]"):
        load_records("vqa-rad", "train", data_dir=tmp_path)
    del train[3]["question"]
    (tmp_path / OFFICIAL).unlink()  # without the release, the split file must carry every field
    (tmp_path / "trainset.json").write_text(json.dumps(train))
    with pytest.raises(DataError, match=r"trainset\.json: record 3 has no 'question'"):
        load_records("vqa-rad", "train", data_dir=tmp_path)
    (tmp_path / "trainset.json").write_text("[{\"qid\": 1,")
    with pytest.raises(DataError, match=r"trainset\.json is not valid JSON"):
        load_records("vqa-rad", "train", data_dir=tmp_path)


def test_empty_split_is_an_error(vqa_rad_dir, tmp_path):
    _small_copy(vqa_rad_dir, tmp_path)
    (tmp_path / "trainset.json").write_text("[]")
    with pytest.raises(DataError, match="'train' of dataset 'vqa-rad' is empty"):
        load_records("vqa-rad", "train", data_dir=tmp_path)


def test_reduced_scale_decode_stays_close_to_a_full_decode(vqa_rad_dir):
    import numpy as np
    from PIL import Image

    from peftmed.data import VQADataset

    rec = load_records("vqa-rad", "test", data_dir=vqa_rad_dir)[0]
    fast = VQADataset([rec], image_size=64, cache=False)[0]["image"].permute(1, 2, 0).numpy().astype(float)
    full = np.asarray(Image.open(rec.image).convert("RGB").resize((64, 64), Image.BICUBIC)).astype(float)
    assert Image.open(rec.image).size[0] >= 4 * 64  # the scan is large enough for a reduced-scale decode
    assert np.abs(fast - full).mean() < 4.0  # out of 255


def test_the_loader_states_which_release_it_read(vqa_rad_dir, tmp_path):
    """A result names its split: the files read, their question counts and digests (metrics.json keeps it)."""
    from peftmed.data.vqa_rad import SPEC

    text = SPEC.describe(vqa_rad_dir)
    assert "VQA_RAD Dataset Public.json (2,248 questions" in text
    assert "trainset.json (1,798 questions" in text and "testset.json (450 questions" in text
    import shutil

    other = tmp_path / "vqa_rad"
    shutil.copytree(vqa_rad_dir, other, ignore=shutil.ignore_patterns("images"))
    (other / "images").mkdir()
    rows = json.loads((other / "testset.json").read_text())
    (other / "testset.json").write_text(json.dumps(rows[:-1]))
    changed = SPEC.describe(other)
    assert "testset.json (449 questions" in changed and changed != text  # another split is another statement
