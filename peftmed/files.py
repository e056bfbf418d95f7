"""Writing files so a crash never leaves half of one in place, and hashing what was written.

Every file peftmed writes that another run reads back (adapters, checkpoints, results, run configs)
goes through ``write_bytes_atomic``: the bytes go to a temporary file in the same folder, are flushed
to disk, and the temporary file is renamed over the target (``os.replace`` is atomic on POSIX and
Windows). Temporary names start with ``.<target name>.`` and end with ``.tmp``, so what an interrupted
write leaves behind is recognisable (a checkpoint folder clears its own) and nothing else is ever touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError

TMP_SUFFIX = ".tmp"


def _limit(path: str, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def check_output_path(path: str | os.PathLike, *, flag: str = "--output", kind: str = "folder") -> Path:
    """Refuse, before any work, an output path that cannot be written: a name longer than the file system
    allows, a path over its length limit, a parent that is a file, a folder that cannot hold new files
    (read-only, /proc, no permission), or a folder where a file is expected (and the reverse).

    ``kind`` is ``"folder"`` (the command writes several files into ``path``) or ``"file"``. Nothing is
    created: the check writes and removes one probe file in the nearest folder that exists."""
    if path is None or str(path) == "":
        raise ConfigError(f"{flag} is empty; pass a path")
    text = os.fspath(path)
    if "\x00" in text:
        raise ConfigError(f"{flag} {text!r} holds a NUL character")
    target = Path(text)
    absolute = Path(os.path.abspath(text))
    path_max = _limit("/", "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(absolute))) >= path_max:
        raise ConfigError(f"{flag} is {len(os.fsencode(str(absolute)))} bytes long (as an absolute path); this file "
                          f"system allows paths shorter than {path_max}: choose a shorter one")
    name_max = _limit("/", "PC_NAME_MAX", 255)
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{flag} {text[:60]!r}...: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; "
                              f"this file system allows {name_max}")
    if target.exists():
        if kind == "folder" and not target.is_dir():
            raise ConfigError(f"{flag} {text!r} is a file; pass a folder")
        if kind == "file" and target.is_dir():
            raise ConfigError(f"{flag} {text!r} is a folder; pass a file name")
    existing = absolute if kind == "folder" else absolute.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {text!r} cannot be created: {str(existing)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".peftmed-probe.", suffix=TMP_SUFFIX, dir=existing)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += " (no permission to write there)"
        raise ConfigError(f"{flag} {text!r} cannot be written: creating a file in {str(existing)!r} fails: "
                          f"{reason}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows opening folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    return _replace_atomic(path, lambda fh: fh.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_options) -> Path:
    """JSON (indent 2 unless told otherwise) written atomically."""
    dump_options.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(data, **dump_options))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
