"""VQA-RAD (Lau et al. 2018): the official release JSON plus the common train/test split files.

Layout of ``data_dir``::

    VQA_RAD Dataset Public.json   official release, 2,248 questions (all fields)
    trainset.json, testset.json   the split recent Med-VQA work uses (1,798 / 450 questions)
    images/synpicNNNN.jpg         315 images

``train`` / ``test`` take their questions from the split files and the release's extra fields
(phrase_type, question_rephrase, evaluation...) from the official JSON by qid; ``all`` is the whole
official release. Questions are answered about shared images, so ``image_id`` is the file name.
"""

from __future__ import annotations

from .jsonfiles import VQAFields, data_root, drop_missing_images, field, read_records, release_of, vqa_record
from .records import DataError, DatasetSpec, VQARecord

OFFICIAL_JSON = "VQA_RAD Dataset Public.json"
SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}
FIELDS = VQAFields("vqa-rad", image="image_name", question_type="question_type", organ="image_organ", upper=True)


def load(split: str, data_dir=None, skip_missing: bool = False) -> list[VQARecord]:
    root = data_root(data_dir, "vqa-rad", must_contain=("images",))
    official_path = root / OFFICIAL_JSON
    official: dict[str, dict] = {}
    if official_path.exists() or split == "all":
        for i, rec in enumerate(read_records(official_path)):
            official[str(field(rec, "qid", official_path, i, (str, int)))] = rec
    if split == "all":
        path, rows = official_path, list(official.values())
    else:
        path = root / SPLIT_FILES[split]
        rows = read_records(path)

    records = []
    for i, rec in enumerate(rows):
        qid = str(field(rec, "qid", path, i, (str, int)))
        if official and qid not in official:
            raise DataError(f"{path}: record {i} has qid {qid!r}, which is not in {official_path.name}")
        full = {**official.get(qid, {}), **rec}
        records.append(vqa_record(full, path, i, FIELDS, root / "images"))
    return drop_missing_images(records, "vqa-rad", skip_missing)


def release(data_dir=None, **options) -> str:
    """Which VQA-RAD files were read: the official release and the split files, with question counts and a
    digest of each (a result names the split it was scored on)."""
    root = data_root(data_dir, "vqa-rad", must_contain=("images",))
    return release_of("vqa-rad", root, {"official release": OFFICIAL_JSON, **SPLIT_FILES})


SPEC = DatasetSpec(
    name="vqa-rad",
    description="VQA-RAD radiology VQA (315 images; train 1,798 / test 450 questions); needs --data-dir",
    load=load,
    splits=("train", "test", "all"),
    needs_data_dir=True,
    options={"skip_missing": "skip (and log) questions whose image file is missing instead of failing"},
    release=release,
)
