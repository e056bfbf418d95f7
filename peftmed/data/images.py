"""Image files of a dataset: paths that stay inside the dataset folder, decoding that names the file and
the question, and a check of every image before training starts.

A dataset's annotation file names its images (``image_name`` in VQA-RAD, ``img_name`` in SLAKE...);
``dataset_file`` joins such a name to the dataset's image folder and refuses one that leaves it
(``../../etc/passwd``, an absolute path). ``open_image`` decodes an image completely, so a truncated
file, a file that is not an image or a decompression bomb fails there with the file and the record
named, not mid-training. ``verify_images`` runs that over every distinct image of a record list
before any training step (about 1 ms per VQA-RAD image; results are kept per process, keyed by the
file's path, size and modification time).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError, MissingDataError

if TYPE_CHECKING:  # PIL is imported where images are read (help and listings never import it)
    from PIL import Image

# (path, size, mtime_ns, draft side) of files that decoded cleanly in this process
_VERIFIED: set[tuple[str, int, int, int]] = set()


def dataset_file(folder: str | os.PathLike, name: str, *, dataset: str, record: str) -> Path:
    """``folder / name`` where ``name`` comes from an annotation file; a name that would leave ``folder``
    (absolute, or climbing out with ``..``) is refused, naming the record."""
    text = str(name)
    if not text or os.path.isabs(text) or text.startswith(("/", "\\")) or os.path.splitdrive(text)[0]:
        raise DataError(f"dataset {dataset!r}: record {record!r} names the image {text!r}, which is not a path "
                        f"inside the dataset's image folder {str(folder)!r}")
    base = os.path.normpath(os.fspath(folder))
    joined = os.path.normpath(os.path.join(base, text))
    if os.path.commonpath([base, joined]) != base or joined == base:
        raise DataError(f"dataset {dataset!r}: record {record!r} names the image {text!r}, which leaves the "
                        f"dataset's image folder {str(folder)!r}; refused")
    return Path(joined)


def open_image(source: str | os.PathLike | Callable[[], Image.Image], *, what: str,
               min_size: int | None = None) -> Image.Image:
    """Decode ``source`` fully as an RGB PIL image; any failure is a DataError naming ``what`` and the file.

    ``min_size`` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) that keeps both sides >= min_size.
    Decompression bombs (Pillow's size limit) are errors, not warnings.
    """
    if callable(source):
        try:
            return source().convert("RGB")
        except Exception as exc:
            raise DataError(f"{what}: the generated image failed: {type(exc).__name__}: {exc}") from exc
    from PIL import Image

    path = Path(source)
    if not path.is_file():
        raise MissingDataError(f"{what}: image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if min_size is not None:
                    img.draft("RGB", (min_size, min_size))  # no-op for formats other than JPEG
                img.load()
                return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            MemoryError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            reason = f"too many pixels, refused as a possible decompression bomb ({exc})"
        elif type(exc).__name__ == "UnidentifiedImageError":
            reason = "not an image file Pillow can read"
        raise DataError(f"{what}: cannot read the image {path}: {reason}") from exc


def verify_images(records: Sequence, *, min_size: int | None = 64, where: str = "dataset") -> int:
    """Decode every distinct image file of ``records`` once; raise one DataError listing the failures
    (file and record id) before anything trains. Returns the number of files checked now."""
    seen: set[str] = set()
    failures: list[str] = []
    checked = 0
    side = int(min_size or 0)
    for rec in records:
        views = getattr(rec, "views", None) or (getattr(rec, "image", None),)
        rid = getattr(rec, "qid", None) or getattr(rec, "id", "?")
        for view in views:
            if view is None or callable(view):
                continue  # generated images are produced by code, not read from disk
            key = os.path.abspath(os.fspath(view))
            if key in seen:
                continue
            seen.add(key)
            try:
                stat = os.stat(key)
            except OSError:
                failures.append(f"question/record {rid!r}: image file not found: {view}")
                continue
            token = (key, stat.st_size, stat.st_mtime_ns, side)
            if token in _VERIFIED:
                continue
            try:
                open_image(key, what=f"record {rid!r}", min_size=min_size)
            except DataError as exc:
                failures.append(str(exc))
                continue
            checked += 1
            _VERIFIED.add(token)
    if failures:
        shown = "\n  ".join(failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise DataError(f"{where}: {len(failures)} image(s) cannot be used:\n  {shown}{more}\n"
                        f"fix or remove them (a dataset's skip_missing option skips missing files only)")
    return checked
