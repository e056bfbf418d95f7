"""Reading annotation files with errors that name the file and the record index."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path

from ..files import sha256_file
from .images import dataset_file
from .records import DataError, MissingDataError, VQARecord

log = logging.getLogger("peftmed.data")


def data_root(data_dir, dataset: str, must_contain: Iterable[str] = ()) -> Path:
    """``data_dir`` as a Path, checked to exist (with the entries ``dataset`` needs)."""
    if data_dir is None:
        raise MissingDataError(f"dataset {dataset!r} reads files: pass data_dir= (CLI: --data-dir)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingDataError(f"data directory of dataset {dataset!r} not found: {root}")
    for name in must_contain:
        if not (root / name).exists():
            raise MissingDataError(f"dataset {dataset!r}: {root / name} not found (is {root} its folder?)")
    return root


def read_records(path: Path) -> list[dict]:
    """A JSON file holding a list of objects; a malformed file or record names the file and index."""
    if not path.is_file():
        raise MissingDataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); the file is damaged") from None
    except RecursionError:
        raise DataError(f"{path} is nested too deeply; expected a JSON list of question records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of question records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
    return data


def field(rec: dict, key: str, path: Path, index: int, kinds=(str,)):
    """``rec[key]``, required and of one of ``kinds``; else an error naming file, index and key."""
    if key not in rec:
        raise DataError(f"{path}: record {index} has no {key!r} field (fields: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(
            f"{path}: record {index} field {key!r} is {value!r}; expected {' or '.join(k.__name__ for k in kinds)}"
        )
    return value


@dataclass(frozen=True)
class VQAFields:
    """Which fields of a dataset's JSON question are a ``VQARecord``'s (``qid``, ``question``, ``answer`` and
    ``answer_type`` are named so in every release); every other field goes to ``extra``."""

    dataset: str  # the name errors give
    image: str  # the image file's name, relative to the images folder
    question_type: str
    organ: str
    upper: bool = False  # strip and upper-case the question type and organ (VQA-RAD writes both cases)

    @property
    def mapped(self) -> set[str]:
        return {"qid", "question", "answer", "answer_type", self.image, self.question_type, self.organ}


def vqa_record(rec: dict, path: Path, index: int, fields: VQAFields, images: Path) -> VQARecord:
    """The ``VQARecord`` of question ``index`` of ``path``: a missing field, a value of the wrong type or a bad value
    (e.g. answer_type) is reported with the file and the record's index."""
    image = field(rec, fields.image, path, index)
    qid = str(field(rec, "qid", path, index, (str, int)))
    tidy = (lambda v: str(v).strip().upper()) if fields.upper else str
    try:
        return VQARecord(
            qid=qid,
            question=field(rec, "question", path, index),
            answer=str(field(rec, "answer", path, index, (str, int, float))),
            answer_type=field(rec, "answer_type", path, index),
            image=str(dataset_file(images, image, dataset=fields.dataset, record=qid)),
            image_id=image,
            question_type=tidy(rec.get(fields.question_type, "")),
            organ=tidy(rec.get(fields.organ, "")),
            extra={k: v for k, v in rec.items() if k not in fields.mapped},
        )
    except DataError as exc:
        raise DataError(f"{path}: record {index}: {exc}") from exc


def drop_missing_images(records: list[VQARecord], dataset: str, skip_missing: bool) -> list[VQARecord]:
    """Check every image file exists; raise naming the qid and path, or skip (and log) when told to."""
    kept, missing = [], []
    for rec in records:
        if callable(rec.image) or Path(rec.image).is_file():
            kept.append(rec)
        else:
            missing.append(rec)
    if missing and not skip_missing:
        first = missing[0]
        raise MissingDataError(
            f"dataset {dataset!r}: image of question {first.qid!r} not found: {first.image} "
            f"({len(missing)} question(s) lack their image; skip_missing=True skips them)"
        )
    if missing:
        log.warning("dataset %r: skipped %d question(s) whose image is missing (first: qid %r, %s)",
                    dataset, len(missing), missing[0].qid, missing[0].image)
    return kept


def release_of(dataset: str, root: Path, files: dict[str, str]) -> str:
    """``dataset: <label> <file> (N questions, sha256 <12 hex>); ...`` for the files of ``files`` (label ->
    file name) that exist in ``root``: which release a result was scored on."""
    parts = []
    for label, name in files.items():
        path = root / name
        if path.is_file():
            parts.append(f"{label} {name} ({len(read_records(path)):,} questions, sha256 {sha256_file(path)[:12]})")
    return f"{dataset}: " + ("; ".join(parts) or "no annotation files found")
