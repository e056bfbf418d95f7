"""``VQADataset``: records -> model-ready items, with every image decoded and resized only once.

A Med-VQA set asks many questions about each image (VQA-RAD: 2,248 questions on 315 images), and
decoding a 2,000-pixel JPEG costs far more than a training step of a small model, so the resized
uint8 image is cached in memory by ``(image_id, size)`` and, with ``cache_dir``, on disk as ``.npy``
(shared between runs and DataLoader workers). ``benchmarks/data/bench_loading.py`` measures both.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .records import VQARecord, check_unique_qids

if TYPE_CHECKING:  # PIL is imported where images are read (help and listings never import it)
    from PIL import Image

ITEM_TEXT_FIELDS = ("question", "answer", "qid", "answer_type", "question_type", "organ")


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB, bicubic resize to ``size`` x ``size``, as a uint8 tensor (3, size, size)."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _cache_file(cache_dir: Path, image_id: str, size: int) -> Path:
    # readable stem + hash: two ids that sanitise alike ("a/b", "a_b") still get distinct files
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]
    digest = hashlib.sha1(image_id.encode()).hexdigest()[:10]
    return cache_dir / f"{stem}-{digest}-{size}px.npy"


class VQADataset(Dataset):
    """A torch Dataset over ``VQARecord``s; ``collate`` batches its items.

    Each item is ``{"image": uint8 (3, S, S), "question", "answer", "qid", "answer_type",
    "question_type", "organ"}`` with S = ``image_size``. ``cache=True`` keeps resized images in memory
    (per process: with DataLoader workers, pass ``persistent_workers=True`` so each worker keeps its
    cache across epochs, or use ``cache_dir``); ``cache_dir`` also stores them on disk, keyed by
    image_id and size. Records (phantom images included) pickle, so workers can be spawned.
    """

    def __init__(self, records: Sequence[VQARecord], image_size: int, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ConfigError(f"image_size must be a positive int (pixels), got {image_size!r}")
        self.records = list(records)
        check_unique_qids(self.records, "VQADataset")
        self.image_size = image_size
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._images: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        item = {"image": self.image(rec)}
        for name in ITEM_TEXT_FIELDS:
            item[name] = getattr(rec, name)
        return item

    def image(self, rec: VQARecord) -> torch.Tensor:
        """The resized image of ``rec``, from the memory cache, the disk cache, or decoded now."""
        cached = self._images.get(rec.image_id) if self.cache else None
        if cached is not None:
            return cached
        tensor = self._from_disk(rec.image_id)
        if tensor is None:
            tensor = image_to_tensor(rec.load_image(min_size=self.image_size), self.image_size)
            self._to_disk(rec.image_id, tensor)
        if self.cache:
            self._images[rec.image_id] = tensor
        return tensor

    def _from_disk(self, image_id: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        path = _cache_file(self.cache_dir, image_id, self.image_size)
        try:
            arr = np.load(path)
        except (FileNotFoundError, ValueError, OSError):
            return None  # absent or unreadable (e.g. a partial file from a killed run): decode again
        if arr.shape != (3, self.image_size, self.image_size) or arr.dtype != np.uint8:
            return None
        return torch.from_numpy(arr)

    def _to_disk(self, image_id: str, tensor: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        path = _cache_file(self.cache_dir, image_id, self.image_size)
        # temp file + rename: a concurrent reader (another worker) never sees half a file
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, tensor.numpy())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def warm(self) -> None:
        """Decode every image now (once per distinct image), e.g. before timing a training loop."""
        for rec in self.records:
            self.image(rec)


def collate(items: Sequence[dict]) -> dict:
    """Batch ``VQADataset`` items into what ``model.compute_loss(batch)`` / ``generate(batch)`` take.

    ``{"images": uint8 (B, 3, S, S), "questions", "answers", "qids", "answer_types",
    "question_types", "organs"}`` (lists of str, in item order).
    """
    if not items:
        raise ConfigError("collate got an empty list of items")
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"cannot batch images of different shapes {sorted(shapes)}; use one image_size")
    batch = {"images": torch.stack([it["image"] for it in items])}  # (B, 3, S, S)
    for name in ITEM_TEXT_FIELDS:
        batch[name + "s"] = [it[name] for it in items]
    return batch
