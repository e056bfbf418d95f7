"""A run's tokenizer on disk: saved beside the adapter, loaded back by the backbone, identified by a hash.

A model built from random weights trains its tokenizer on the dataset text, so an adapter is only
meaningful with the exact vocabulary it was trained with. The run folder keeps that tokenizer
(``tokenizer/``), the adapter manifest records its identity (SHA-256 of the token -> id map), and
loading refuses a model whose tokenizer differs.

Nothing read from disk names code: the folder is read by the backbone's registered
``tokenizer_loader`` (``Backbone.load_tokenizer``), never by a class named in a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError, PeftmedError
from .files import write_json_atomic

IDENTITY_FILE = "peftmed_tokenizer.json"


def tokenizer_vocab(tok: Any) -> dict[str, int] | None:
    """The token -> id map of a tokenizer (special tokens included), or None when it has none."""
    for owner in (tok, getattr(tok, "backend", None)):
        get_vocab = getattr(owner, "get_vocab", None)
        if callable(get_vocab):
            try:
                return dict(get_vocab(with_added_tokens=True))
            except TypeError:
                return dict(get_vocab())
    return None


def tokenizer_fingerprint(tok: Any) -> str | None:
    """SHA-256 of the sorted token -> id map: equal for the same vocabulary, whatever object holds it."""
    if tok is None:
        return None
    vocab = tokenizer_vocab(tok)
    if vocab is None:
        return None
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_tokenizer(tok: Any, folder: str | Path, backbone: str) -> str | None:
    """Write ``tok`` to ``folder`` (its own format) plus ``peftmed_tokenizer.json`` (backbone and hash).

    Returns the fingerprint, or None when the tokenizer cannot be saved (nothing is written then).
    """
    if tok is None:
        return None
    folder = Path(folder)
    if callable(getattr(tok, "save_pretrained", None)):
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(folder))
    elif callable(getattr(tok, "save", None)):
        tok.save(folder)
    else:
        return None
    fingerprint = tokenizer_fingerprint(tok)
    write_json_atomic(folder / IDENTITY_FILE, {"backbone": backbone, "sha256": fingerprint})
    return fingerprint


def read_identity(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), (str, type(None))):
        raise ConfigError(f"{path} must hold {{'backbone': ..., 'sha256': ...}}, got {data!r}")
    return data


def load_tokenizer(backbone, folder: str | Path) -> Any:
    """The tokenizer saved in ``folder``, read by ``backbone``'s registered loader and checked against
    the hash written beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {str(folder)!r} does not exist")
    try:
        tok = backbone.load_tokenizer(folder)
    except PeftmedError:
        raise
    except Exception as exc:  # tokenizers, transformers and json raise their own types for a damaged file
        files = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())[:6]) or "no files"
        raise ConfigError(f"the tokenizer in {str(folder)!r} ({files}) cannot be read by backbone "
                          f"{getattr(backbone, 'name', '?')!r}: {type(exc).__name__}: {str(exc)[:200]}; the files were "
                          f"changed or damaged (restore them from the run, or train a new run)") from None
    identity = read_identity(folder)
    if identity is not None and identity.get("sha256"):
        found = tokenizer_fingerprint(tok)
        if found is not None and found != identity["sha256"]:
            raise PeftmedError(
                f"the tokenizer in {str(folder)!r} does not match the hash recorded beside it "
                f"({identity['sha256'][:12]}... expected, {found[:12]}... found): the files were changed")
    return tok
