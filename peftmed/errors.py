"""Exceptions peftmed raises, and the helper that suggests the closest valid name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftmedError(Exception):
    """Base class of every error peftmed raises on bad input. The CLI prints it (no traceback) and exits
    with ``exit_code`` (2: bad input)."""

    exit_code = 2


class UnknownNameError(PeftmedError, KeyError):
    """A name (method, backbone, component, option, dataset...) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "", where: str = ""):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(unknown_message(kind, name, self.known, hint, where))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class RecipeError(PeftmedError, ValueError):
    """A recipe that cannot be parsed or applied."""


class NoMatchError(RecipeError):
    """A method that finds nothing to act on in a component (no module of its roles)."""


class ConfigError(PeftmedError, ValueError):
    """A method or backbone option outside its valid range."""


class AdapterError(PeftmedError, ValueError):
    """An adapter folder that cannot be loaded onto this model."""


class PluginError(PeftmedError, RuntimeError):
    """A plugin that failed to load or registered something invalid."""


class ShapeError(PeftmedError, ValueError):
    """Tensors whose shapes do not agree."""


def unknown_message(kind: str, name: str, known: Iterable[str], hint: str = "", where: str = "") -> str:
    known = sorted(known)
    msg = f"unknown {kind} {name!r}" + (f" {where}" if where else "")
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    listed = ", ".join(known) if known else "(none)"
    msg += f" Known {kind}s: {listed}." if " " not in kind else f" Known: {listed}."
    if hint:
        msg += " " + hint
    return msg


class DataError(PeftmedError, ValueError):
    """Dataset files or records that cannot be used (malformed, empty, leaking test questions)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data directory, annotation file or image that does not exist."""
