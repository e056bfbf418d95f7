"""SLAKE (Liu et al. 2021) in its official layout; English questions by default.

Layout of ``data_dir``::

    train.json, validate.json, test.json   lists of {qid, img_name, question, answer, answer_type,
                                           q_lang, content_type, location, modality, ...}
    imgs/<img_name>                        e.g. imgs/xmlab1/source.jpg

``question_type`` is SLAKE's ``content_type`` (Organ, Position, Abnormality...), ``organ`` its
``location`` (Lung, Abdomen...). ``lang="en"`` (default), ``"zh"`` or ``"all"``.
"""

from __future__ import annotations

from ..errors import ConfigError
from .jsonfiles import VQAFields, data_root, drop_missing_images, read_records, release_of, vqa_record
from .records import DatasetSpec, VQARecord

SPLITS = ("train", "validate", "test")
LANGS = ("en", "zh", "all")
FIELDS = VQAFields("slake", image="img_name", question_type="content_type", organ="location")


def load(split: str, data_dir=None, lang: str = "en", skip_missing: bool = False) -> list[VQARecord]:
    if lang not in LANGS:
        raise ConfigError(f"slake: lang must be one of {LANGS}, got {lang!r}")
    root = data_root(data_dir, "slake", must_contain=("imgs",))
    path = root / f"{split}.json"
    records = []
    for i, rec in enumerate(read_records(path)):
        q_lang = str(rec.get("q_lang", "en"))
        if lang != "all" and q_lang != lang:
            continue
        records.append(vqa_record(rec, path, i, FIELDS, root / "imgs"))
    return drop_missing_images(records, "slake", skip_missing)


def release(data_dir=None, **options) -> str:
    """Which SLAKE files were read, with question counts (all languages) and a digest of each."""
    root = data_root(data_dir, "slake", must_contain=("imgs",))
    return release_of("slake", root, {split: f"{split}.json" for split in SPLITS})


SPEC = DatasetSpec(
    name="slake",
    description="SLAKE bilingual radiology VQA (official layout, English by default); needs --data-dir",
    load=load,
    splits=SPLITS,
    needs_data_dir=True,
    options={"lang": "question language: en (default), zh or all",
             "skip_missing": "skip (and log) questions whose image file is missing instead of failing"},
    release=release,
)
