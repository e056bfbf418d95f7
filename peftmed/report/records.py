"""The report record, a caching torch Dataset over report records, and the report batch.

A report record is one study: one or more image views and the free-text report written about them.
Report datasets register a ``DatasetSpec`` with ``task="report"`` whose ``load`` returns
``ReportRecord``s; ``ReportDataset`` + ``report_collate`` turn them into the report batch every
report model takes::

    {"images": uint8 (B, 3, S, S), "reports": [str], "ids": [str], "qids": [str]}

``qids`` repeats ``ids`` so code written for the VQA batch (which keys predictions by ``qids``) works
unchanged. Models that take one image get the record's first view (see ``ReportRecord.views``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..data.dataset import VQADataset
from ..data.images import open_image
from ..data.records import DataError, ImageSource
from ..errors import ConfigError

if TYPE_CHECKING:  # PIL is imported where images are read
    from PIL import Image


@dataclass
class ReportRecord:
    """One study: image view(s) and its report.

    Fields:
      id: study id, unique within a dataset (predictions are matched to reports by it).
      report: the reference report as released.
      views: image file paths, or zero-argument callables returning a PIL image (generated images);
        the first view is the one a single-image model sees.
      image_id: stable key of the first view (caches use it).
      split: the split the record came from.
      extra: anything else the dataset provides (e.g. a phantom image's planted findings).
    """

    task: ClassVar[str] = "report"

    id: str
    report: str
    views: tuple[ImageSource, ...]
    image_id: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.id = str(self.id)
        if not isinstance(self.report, str):
            raise DataError(f"record {self.id!r}: report must be a string, got {type(self.report).__name__}")
        self.views = tuple(self.views)
        if not self.views:
            raise DataError(f"record {self.id!r} has no image")
        if not self.image_id:
            first = self.views[0]
            self.image_id = self.id if callable(first) else str(first)

    @property
    def qid(self) -> str:
        """The id under the name the VQA helpers use (uniqueness checks, predictions by qid)."""
        return self.id

    def load_image(self, min_size: int | None = None) -> Image.Image:
        """The first view as an RGB PIL image (a missing file names the record and the path)."""
        return open_image(self.views[0], what=f"report {self.id!r}", min_size=min_size)


class ReportDataset(VQADataset):
    """A torch Dataset over ``ReportRecord``s (items ``{"image", "report", "id"}``); images are decoded,
    resized and cached exactly as ``peftmed.data.VQADataset`` does (memory, and ``cache_dir`` on disk)."""

    def __init__(self, records: Sequence[ReportRecord], image_size: int, cache: bool = True, cache_dir=None):
        bad = next((r for r in records if not isinstance(r, ReportRecord)), None)
        if bad is not None:
            raise ConfigError(f"ReportDataset takes ReportRecords (a dataset with task 'report'), got a "
                              f"{type(bad).__name__}")
        super().__init__(records, image_size, cache=cache, cache_dir=cache_dir)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        return {"image": self.image(rec), "report": rec.report, "id": rec.id}


def report_collate(items: Sequence[dict]) -> dict:
    """Batch ``ReportDataset`` items: ``{"images": (B, 3, S, S), "reports", "ids", "qids"}``."""
    import torch

    if not items:
        raise ConfigError("report_collate got an empty list of items")
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"cannot batch images of different shapes {sorted(shapes)}; use one image_size")
    ids = [it["id"] for it in items]
    return {"images": torch.stack([it["image"] for it in items]), "reports": [it["report"] for it in items],
            "ids": ids, "qids": list(ids)}
