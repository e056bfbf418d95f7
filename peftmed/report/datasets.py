"""Report datasets: ``iu-xray`` and ``mimic-cxr`` in the R2Gen layout, and ``phantom-report``.

R2Gen layout of ``data_dir`` (the format R2Gen, R2GenCMN and most report-generation work use)::

    annotation.json   {"train": [...], "val": [...], "test": [...]}, each record
                      {"id": ..., "report": "...", "image_path": ["<rel path>", ...], "split": ...}
                      (mimic-cxr records also carry study_id / subject_id, kept in ``extra``)
    images/           the image files; image_path entries are relative to images/

IU X-Ray studies have two views (frontal and lateral), MIMIC-CXR one per record in R2Gen's file.

Bad input: a record whose report is empty or only whitespace is skipped and counted (logged), or an
error with ``empty_reports="error"``; a split missing from annotation.json is an error naming the
splits present; an image path that does not exist names the record id and the path (or, with
``skip_missing=True``, the record is skipped and counted).

``phantom-report`` is the generated phantom dataset (``peftmed.data.phantom``) seen as reports: one
record per image with its report and planted findings, in the same two domains (``ct``, ``mr``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data import phantom
from ..data.jsonfiles import data_root
from ..data.images import dataset_file
from ..data.records import DataError, DatasetSpec, MissingDataError
from ..errors import ConfigError
from .records import ReportRecord

log = logging.getLogger("peftmed.report")

ANNOTATION = "annotation.json"
R2GEN_SPLITS = ("train", "val", "test")
EMPTY_POLICIES = ("skip", "error")


def load_r2gen(name: str, split: str, data_dir=None, empty_reports: str = "skip",
               skip_missing: bool = False) -> list[ReportRecord]:
    """Records of ``split`` from an R2Gen-layout folder (``annotation.json`` + ``images/``)."""
    if empty_reports not in EMPTY_POLICIES:
        raise ConfigError(f"{name}: empty_reports must be one of {EMPTY_POLICIES}, got {empty_reports!r}")
    root = data_root(data_dir, name, must_contain=(ANNOTATION,))
    path = root / ANNOTATION
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with lists {list(R2GEN_SPLITS)}, got {type(data).__name__}")
    if split not in data:
        raise DataError(f"{path} has no {split!r} split (it has {sorted(data)}); R2Gen annotation files hold "
                        f"{', '.join(repr(s) for s in R2GEN_SPLITS)}")
    rows = data[split]
    if not isinstance(rows, list):
        raise DataError(f"{path}: split {split!r} must be a list of records, got {type(rows).__name__}")

    records, empty, missing = [], [], []
    for i, row in enumerate(rows):
        rid, report, views = _fields(row, path, split, i)
        if not report.strip():
            empty.append(rid)
            continue
        files = [dataset_file(root / "images", v, dataset=name, record=rid) for v in views]
        absent = [f for f in files if not f.is_file()]
        if absent:
            missing.append((rid, absent[0]))
            continue
        extra = {k: v for k, v in row.items() if k not in ("id", "report", "image_path", "split")}
        records.append(ReportRecord(id=rid, report=report, views=tuple(str(f) for f in files),
                                    image_id=views[0], split=str(row.get("split", split)), extra=extra))
    if empty:
        if empty_reports == "error":
            raise DataError(f"{name}/{split}: {len(empty)} record(s) have an empty report (first: id {empty[0]!r}); "
                            f"empty_reports='skip' skips them")
        log.warning("%s/%s: skipped %d record(s) with an empty report (first: id %r)", name, split, len(empty),
                    empty[0])
    if missing:
        rid, file = missing[0]
        if not skip_missing:
            raise MissingDataError(f"{name}/{split}: image of record {rid!r} not found: {file} ({len(missing)} "
                                   f"record(s) lack an image; skip_missing=True skips them)")
        log.warning("%s/%s: skipped %d record(s) whose image is missing (first: id %r, %s)", name, split,
                    len(missing), rid, file)
    return records


def _fields(row, path: Path, split: str, index: int) -> tuple[str, str, list[str]]:
    where = f"{path}: {split}[{index}]"
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, expected an object")
    for key in ("id", "report", "image_path"):
        if key not in row:
            raise DataError(f"{where} has no {key!r} field (fields: {sorted(row)})")
    rid, report, views = row["id"], row["report"], row["image_path"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(f"{where}: id must be a string or an integer, got {rid!r}")
    if not isinstance(report, str):
        raise DataError(f"{where} (id {rid!r}): report must be a string, got {report!r}")
    if isinstance(views, str):
        views = [views]
    if not isinstance(views, list) or not views or not all(isinstance(v, str) and v for v in views):
        raise DataError(f"{where} (id {rid!r}): image_path must be a non-empty list of paths, got {views!r}")
    return str(rid), report, views


def _r2gen_spec(name: str, description: str) -> DatasetSpec:
    def load(split: str, data_dir=None, empty_reports: str = "skip", skip_missing: bool = False):
        return load_r2gen(name, split, data_dir, empty_reports=empty_reports, skip_missing=skip_missing)

    return DatasetSpec(
        name=name, description=description, load=load, task="report", splits=R2GEN_SPLITS, needs_data_dir=True,
        options={"empty_reports": "skip (default; logged with a count) or error on a record with an empty report",
                 "skip_missing": "skip (and log) records whose image file is missing instead of failing"})


IU_XRAY = _r2gen_spec("iu-xray", "IU X-Ray chest reports in the R2Gen layout (annotation.json + images/); "
                                 "needs --data-dir")
MIMIC_CXR = _r2gen_spec("mimic-cxr", "MIMIC-CXR chest reports in the R2Gen layout (annotation.json + images/); "
                                     "needs --data-dir")


def load_phantom(split: str, data_dir=None, domain: str = "ct", n_images: int | None = None, seed: int = 0,
                 image_size: int = 64) -> list[ReportRecord]:
    """One record per phantom image: its generated report and its planted findings."""
    records, seen = [], set()
    for rec in phantom.load(split, domain=domain, n_images=n_images, questions_per_image=1, seed=seed,
                            image_size=image_size):
        if rec.image_id in seen:
            continue
        seen.add(rec.image_id)
        records.append(ReportRecord(id=rec.image_id, report=rec.extra["report"], views=(rec.image,),
                                    image_id=rec.image_id, split=split,
                                    extra={"findings": rec.extra["findings"], "domain": domain,
                                           "modality": rec.extra["modality"]}))
    return records


PHANTOM_REPORT = DatasetSpec(
    name="phantom-report",
    description="generated phantom images with a radiology report each and its planted findings (domains ct, mr); "
                "no download",
    load=load_phantom, task="report", splits=("train", "test"), needs_data_dir=False,
    options={"domain": "ct (source) or mr (target)", "n_images": "images in the split (train 800, test 300)",
             "seed": "random seed (0)", "image_size": "generated image side in pixels (64)"})

SPECS = (IU_XRAY, MIMIC_CXR, PHANTOM_REPORT)
