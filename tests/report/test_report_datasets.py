"""Report datasets: the R2Gen layout (iu-xray, mimic-cxr) on fixtures this test writes, bad input,
phantom-report, and the report batch."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from peftmed.data import DataError, MissingDataError, load_records
from peftmed.data import phantom
from peftmed.errors import ConfigError
from peftmed.report import ReportDataset, ReportRecord, report_collate


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24), value, np.uint8), mode="L").save(path)


def _r2gen(root, splits=("train", "val", "test"), mimic=False, records=None):
    """An R2Gen folder: 2 studies per split, IU X-Ray style two views (one view for MIMIC-CXR)."""
    data = {}
    for s in splits:
        rows = []
        for i in range(2):
            sid = f"CXR{s}{i}"
            views = [f"{sid}/0.png"] if mimic else [f"{sid}/0.png", f"{sid}/1.png"]
            for k, v in enumerate(views):
                _png(root / "images" / v, 40 * (i + 1) + k)
            row = {"id": sid, "report": f"The heart size is normal. Study {i} of {s}.", "image_path": views, "split": s}
            if mimic:
                row.update(study_id=100 + i, subject_id=7)
            rows.append(row)
        data[s] = rows
    if records:
        data.update(records)
    (root / "annotation.json").write_text(json.dumps(data))
    return root


def test_iu_xray_loads_every_split_with_both_views(tmp_path, registry):
    root = _r2gen(tmp_path)
    for split in ("train", "val", "test"):
        recs = load_records("iu-xray", split, data_dir=root)
        assert [r.id for r in recs] == [f"CXR{split}0", f"CXR{split}1"]
        assert all(isinstance(r, ReportRecord) and len(r.views) == 2 for r in recs)
    rec = recs[0]
    assert rec.report == "The heart size is normal. Study 0 of test."
    assert rec.image_id == "CXRtest0/0.png" and rec.split == "test"
    assert rec.load_image().size == (24, 20)
    assert registry.get("dataset", "iu-xray").task == "report"


def test_mimic_cxr_keeps_extra_fields(tmp_path, registry):
    recs = load_records("mimic-cxr", "train", data_dir=_r2gen(tmp_path, mimic=True))
    assert len(recs[0].views) == 1 and recs[0].extra == {"study_id": 100, "subject_id": 7}


def test_report_batch(tmp_path, registry):
    recs = load_records("iu-xray", "train", data_dir=_r2gen(tmp_path))
    ds = ReportDataset(recs, image_size=16)
    batch = report_collate([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["reports"] == [r.report for r in recs]
    assert batch["ids"] == batch["qids"] == ["CXRtrain0", "CXRtrain1"]
    # first view is the one a single-image model sees (values 40 vs 41 before resizing)
    assert int(batch["images"][0].float().mean().round()) == 40


def test_empty_report_skipped_and_counted_or_an_error(tmp_path, registry, caplog):
    extra = {"train": [{"id": "E1", "report": "   ", "image_path": ["e/0.png"], "split": "train"},
                       {"id": "E2", "report": "", "image_path": ["e/0.png"], "split": "train"},
                       {"id": "ok", "report": "No acute disease.", "image_path": ["e/0.png"], "split": "train"}]}
    _png(tmp_path / "images" / "e/0.png", 1)
    root = _r2gen(tmp_path, records=extra)
    with caplog.at_level(logging.WARNING, logger="peftmed.report"):
        recs = load_records("iu-xray", "train", data_dir=root)
    assert [r.id for r in recs] == ["ok"]
    assert "skipped 2 record(s) with an empty report" in caplog.text and "'E1'" in caplog.text
    with pytest.raises(DataError, match=r"2 record\(s\) have an empty report \(first: id 'E1'\)"):
        load_records("iu-xray", "train", data_dir=root, empty_reports="error")
    with pytest.raises(ConfigError, match="empty_reports"):
        load_records("iu-xray", "train", data_dir=root, empty_reports="drop")


def test_missing_split_names_the_splits_present(tmp_path, registry):
    root = _r2gen(tmp_path, splits=("train", "test"))
    with pytest.raises(DataError, match=r"no 'val' split \(it has \['test', 'train'\]\)"):
        load_records("iu-xray", "val", data_dir=root)


def test_missing_image_names_record_and_path(tmp_path, registry):
    root = _r2gen(tmp_path)
    (root / "images" / "CXRtest1" / "1.png").unlink()
    with pytest.raises(MissingDataError, match=r"record 'CXRtest1' not found: .*CXRtest1/1\.png"):
        load_records("iu-xray", "test", data_dir=root)
    assert [r.id for r in load_records("iu-xray", "test", data_dir=root, skip_missing=True)] == ["CXRtest0"]


def test_malformed_records_and_folders(tmp_path, registry):
    bad = {"train": [{"id": "X", "report": "fine", "image_path": []}]}
    root = _r2gen(tmp_path, records=bad)
    with pytest.raises(DataError, match=r"train\[0\] \(id 'X'\): image_path must be a non-empty list"):
        load_records("iu-xray", "train", data_dir=root)
    (root / "annotation.json").write_text(json.dumps({"train": [{"report": "x", "image_path": ["a"]}]}))
    with pytest.raises(DataError, match=r"train\[0\] has no 'id' field"):
        load_records("iu-xray", "train", data_dir=root)
    with pytest.raises(MissingDataError, match="--data-dir"):
        load_records("mimic-cxr", "train")
    with pytest.raises(MissingDataError, match="annotation.json"):
        load_records("mimic-cxr", "train", data_dir=tmp_path / "images")


def test_phantom_report_one_record_per_image_with_findings(registry):
    recs = load_records("phantom-report", "train", n_images=12, seed=1)
    again = load_records("phantom-report", "train", n_images=12, seed=1)
    test = load_records("phantom-report", "test", n_images=12, seed=1)
    vqa = phantom.load("train", n_images=12, seed=1)
    assert len(recs) == 12 and len({r.image_id for r in recs}) == 12
    assert [r.report for r in recs] == [r.report for r in again]
    assert {r.image_id for r in recs}.isdisjoint(r.image_id for r in test)
    by_image = {r.image_id: r.extra["report"] for r in vqa}
    assert all(r.report == by_image[r.image_id] and "lesions" in r.extra["findings"] for r in recs)
    mr = load_records("phantom-report", "train", n_images=4, domain="mr")
    assert all(r.extra["modality"].endswith("mri") for r in mr)


def test_report_dataset_refuses_vqa_records(registry):
    with pytest.raises(ConfigError, match="ReportRecord"):
        ReportDataset(phantom.load("train", n_images=1), image_size=16)
