"""The record every dataset yields, the dataset registry entry, and helpers over records.

A dataset plugin registers a ``DatasetSpec`` whose ``load(split, data_dir=None, **options)`` returns a
list of ``VQARecord``. Everything downstream (``VQADataset``, instruction rendering, metrics) works on
records, so a new dataset only has to produce them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..errors import (  # noqa: F401  (DataError, MissingDataError: re-exported)
    DataError,
    MissingDataError,
    UnknownNameError,
)
from ..plugins import default_registry
from .images import open_image

if TYPE_CHECKING:  # PIL is imported where images are read (help and listings never import it)
    from PIL import Image

log = logging.getLogger("peftmed.data")

ANSWER_TYPES = ("CLOSED", "OPEN")

# Final punctuation that answer normalisation strips ("Yes." == "yes"); brackets and quotes are kept
# because they can be part of an answer ("(left)").
_FINAL_PUNCT = ".,;:!?"

ImageSource = Union[str, Path, Callable[[], "Image.Image"]]


# Punctuation inside an answer around which spacing carries no meaning ("x-ray" / "x - ray", "3.4" / "3. 4",
# "( dwi )" / "(dwi)"): a word-piece tokenizer cannot tell them apart when decoding, so comparison ignores it.
_JOINING = re.compile(r"\s*([-/'(),.:;%~])\s*")


def normalize_answer(text: Any) -> str:
    """Lower case, collapse whitespace, drop spaces around inner punctuation, strip final punctuation: how
    answers are compared (lower case and final punctuation as the field does; the spacing rule only merges
    answers that differ by spaces around a hyphen, slash, bracket, apostrophe, comma, decimal point...)."""
    text = re.sub(r"\s+", " ", str(text).lower()).strip()
    text = _JOINING.sub(r"\1", text)
    return text.rstrip(_FINAL_PUNCT).rstrip()


@dataclass
class VQARecord:
    """One question about one image.

    Fields:
      qid: question id, unique within a dataset (predictions are matched to answers by it).
      question, answer: the text as released (normalise with ``normalize_answer`` to compare).
      answer_type: "CLOSED" (yes/no or a choice named in the question) or "OPEN".
      image: a file path, or a zero-argument callable returning a PIL image (generated images).
      image_id: stable key of the image (file name for files); caches and leak checks use it.
      question_type, organ: the dataset's labels, for per-type / per-organ breakdowns.
      extra: anything else the dataset provides (e.g. a phantom image's report and findings).
    """

    qid: str
    question: str
    answer: str
    answer_type: str
    image: ImageSource
    image_id: str
    question_type: str = ""
    organ: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.qid = str(self.qid)
        self.answer = str(self.answer)
        self.answer_type = str(self.answer_type).strip().upper()
        if self.answer_type not in ANSWER_TYPES:
            raise DataError(
                f"question {self.qid!r} has answer_type {self.answer_type!r}; expected one of {ANSWER_TYPES}"
            )

    def load_image(self, min_size: int | None = None) -> Image.Image:
        """The image as an RGB PIL image (decoded now; ``VQADataset`` caches the resized result).

        With ``min_size``, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8) that still keeps
        both sides >= ``min_size``: several times faster for a 2,000-pixel scan resized to 64-480 px.
        """
        return open_image(self.image, what=f"question {self.qid!r}", min_size=min_size)


@dataclass
class DatasetSpec:
    """A registered dataset (what ``--dataset`` names).

    Fields:
      name: the registry name (e.g. "vqa-rad").
      description: one line for listings.
      load: ``load(split, data_dir=None, **options) -> list[VQARecord]``.
      task: what the records are for ("vqa").
      splits: the split names ``load`` accepts; the first is the training split.
      needs_data_dir: True when files must be supplied (``--data-dir``); False for generated data.
      options: option name -> one-line help, for listings and error messages.
      transfer: (source options, target options) of the bench's default transfer protocol on this dataset
        (train fully on the source, adapt each recipe to the target), or None.
      release: ``release(data_dir, **options) -> str``: which release of the data files was read (file names,
        question counts per split, a digest of the split files), so a result names its split; None for data
        that is not read from files.
    """

    name: str
    description: str
    load: Callable[..., list[VQARecord]]
    task: str = "vqa"
    splits: tuple[str, ...] = ("train", "test")
    needs_data_dir: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    transfer: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
    release: Callable[..., str] | None = None

    def describe(self, data_dir=None, **options) -> str:
        """One line saying what was read (``release``), or the dataset's name and options."""
        if self.release is not None:
            return self.release(data_dir, **options)
        shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
        return f"{self.name}" + (f" ({shown})" if shown else "")

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise UnknownNameError("split", split, self.splits, hint=f"(dataset {self.name!r})")


def load_records(name: str, split: str, data_dir=None, registry=None, **options) -> list[VQARecord]:
    """Load ``split`` of the registered dataset ``name`` as a list of records.

    An unknown dataset raises ``UnknownNameError`` listing the registered ones; an empty split raises
    ``DataError``.
    """
    if registry is None:
        registry = default_registry()
    spec: DatasetSpec = registry.get("dataset", name)
    spec.check_split(split)
    unknown = sorted(set(options) - set(spec.options or {}))
    if unknown:
        raise UnknownNameError(f"option of dataset {spec.name!r}", unknown[0], spec.options or {})
    if spec.needs_data_dir and data_dir is None:
        raise MissingDataError(
            f"dataset {spec.name!r} reads files: pass data_dir= (CLI: --data-dir) pointing at its folder"
        )
    records = spec.load(split, data_dir=data_dir, **options)
    if not records:
        raise DataError(f"split {split!r} of dataset {spec.name!r} is empty (data dir: {data_dir})")
    check_unique_qids(records, f"{spec.name}/{split}")
    return records


def check_unique_qids(records: Sequence[VQARecord], where: str = "records") -> None:
    seen: set[str] = set()
    dupes = [r.qid for r in records if r.qid in seen or seen.add(r.qid)]
    if dupes:
        raise DataError(f"{where}: duplicate qid(s) {sorted(set(dupes))[:10]}; qids must be unique")


def question_key(rec) -> tuple[str, str]:
    """What makes two records the same question: the image and the normalised question text (a record
    without a question, a report, is the same as another of the same image)."""
    return rec.image_id, normalize_answer(getattr(rec, "question", ""))


def test_questions_in(train_records: Sequence[VQARecord], test_records: Sequence[VQARecord]) -> list[str]:
    """qids of training records that are test questions: same qid, or same image and question text."""
    test_qids = {r.qid for r in test_records}
    test_keys = {question_key(r) for r in test_records}
    return [r.qid for r in train_records if r.qid in test_qids or question_key(r) in test_keys]


def drop_test_questions(train_records: Sequence[VQARecord], test_records: Sequence[VQARecord],
                        where: str = "training data", quiet: bool = False) -> list[VQARecord]:
    """The training records without those that repeat a test question (VQA-RAD's common split repeats
    three), with one log line naming them; what ``peftmed train`` and ``bench`` train on by default."""
    repeated = set(test_questions_in(train_records, test_records))
    if not repeated:
        return list(train_records)
    if not quiet:
        log.warning("%s: dropped %d training question(s) that repeat a test question (same image and question): "
                    "qid(s) %s (--train-test-overlap keep keeps them)", where, len(repeated), ", ".join(sorted(repeated)))
    return [r for r in train_records if r.qid not in repeated]


def majority_baseline(train_records: Sequence[VQARecord], test_records: Sequence[VQARecord]) -> dict[str, str]:
    """Predict, for every test question, the most frequent (normalised) train answer of its answer type.

    Ties go to the alphabetically first answer, so the baseline is deterministic. An answer type absent
    from the training set falls back to the most frequent answer overall.
    """
    if not train_records:
        raise DataError("majority_baseline needs at least one training record")
    counts: dict[str, Counter] = {t: Counter() for t in ANSWER_TYPES}
    for r in train_records:
        counts[r.answer_type][normalize_answer(r.answer)] += 1
    overall = sum(counts.values(), Counter())

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    best = {t: top(c) if c else top(overall) for t, c in counts.items()}
    return {r.qid: best[r.answer_type] for r in test_records}
