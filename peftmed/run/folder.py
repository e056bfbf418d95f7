"""A run's folder: its layout, its options read back and checked, who may write into it.

Layout of the folder ``peftmed train --output OUT`` writes (every later command reads it)::

    train_config.json   every resolved option (reusable as --config); what rebuilds the run's base model
    tokenizer/          the vocabulary the run trained, when the backbone trains one on the data
    adapter/            the trained adapter (adapter.json + adapter.safetensors)
    checkpoints/        resumable checkpoints (peftmed.train.checkpoint)
    metrics.json        scores and the training summary; predictions.json: one prediction per record
    logs/               --report-to targets
    .peftmed-lock       held (flock) by the process that trains in the folder

Nothing read from here names code to import: options are plain values checked against their types, the
tokenizer is read by the backbone's registered loader.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import check_output_path
from ..tokenizer_files import IDENTITY_FILE
from .config import BASE_MODEL_OPTIONS, check_options

RUN_CONFIG = "train_config.json"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = ".peftmed-lock"
# What a training run writes at the top of its output folder (``--overwrite`` replaces exactly these).
RUN_FILES = (RUN_CONFIG, "metrics.json", "predictions.json")
TOKENIZER_FILES = (IDENTITY_FILE, "class.txt", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


def find_run(adapter: str | os.PathLike) -> Path | None:
    """The training output folder an adapter belongs to (the nearest parent with train_config.json)."""
    adapter = Path(adapter)
    for folder in [adapter, *adapter.resolve().parents][:5]:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def read_run_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The options a run was trained with, each checked against its type (a hand-edited file is an error
    naming the file and the field, never a traceback later)."""
    path = Path(folder) / RUN_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; it was damaged (the run's options cannot be read)") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({str(exc)[:120]}); it was damaged or edited by hand") from None
    return check_options(data, str(path))


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A non-empty output folder is refused unless the run continues (--resume) or replaces (--overwrite)
    what an earlier peftmed run wrote there; files a user put there are never deleted."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                          "--overwrite starts a new one there")
    check_output_path(out, flag="--output", kind="folder")
    if resume or not out.is_dir():
        return
    content = sorted(p.name for p in out.iterdir())
    if content and not overwrite:
        shown = ", ".join(content[:6]) + (" ..." if len(content) > 6 else "")
        raise ConfigError(
            f"output folder {str(out)!r} is not empty (it holds {shown}); pass --resume to continue the run saved "
            f"there, --overwrite to train a new run there (peftmed's files of the earlier run are replaced, nothing "
            f"else is touched), or choose another --output")


class RunLock:
    """An exclusive lock on a run folder while a process trains in it: a second ``--resume`` (or a second
    run into the same ``--output``) is refused naming the process that holds it. The lock is an OS file
    lock (``flock``), so the kernel drops it when its process dies: a killed run never leaves a stale lock."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise ConfigError(f"{str(self.path.parent)!r} is in use: another peftmed process ({holder}) is training "
                              f"in it; wait for it to end, or train into another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {int(data['pid'])} on {data.get('host', '?')}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_same_base(saved: dict[str, Any], opts: dict[str, Any], given: set[str], where: str) -> list[str]:
    """On a resume, the options that decide the frozen base model (backbone, its build options, the
    pretrained folder, the seed of its random init) are the run's: one given with another value is refused
    by name; one not given is taken from the run. Returns notes on what was taken."""
    notes = []
    for key in BASE_MODEL_OPTIONS:
        before, now = saved.get(key), opts.get(key)
        if key == "backbone_options":
            before, now = dict(before or {}), dict(now or {})
        if before == now:
            continue
        if key in given:
            raise ConfigError(
                f"cannot resume {where}: its run was trained with {key} {before!r}, this command gives {now!r}. "
                f"The {key} decides the frozen base model (its random init, build options or weights), so the "
                f"adapter would continue on another model; resume without --{key.replace('_', '-')} (the run's is "
                f"used) or train a new run into another --output")
        opts[key] = before
        notes.append(f"{key} {before!r} (the run's)")
    return notes


__all__ = ["LOCK_FILE", "RUN_CONFIG", "RUN_FILES", "TOKENIZER_DIR", "TOKENIZER_FILES", "RunLock", "check_output",
           "check_same_base", "find_run", "read_run_config"]
