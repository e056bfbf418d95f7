"""Reading what users type: scalar values, KEY=VALUE options, and YAML / TOML / JSON files.

One implementation each, used by every command (``--data-options k=v``, ``--backbone-option k=v``,
recipe option values, experiment and suite files), so a value reads the same everywhere:
``true``/``false`` -> bool, ``none``/``null`` -> None, ``8`` -> int, ``1e-3`` -> float, anything else text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan|infinity)$", re.IGNORECASE)


def parse_scalar(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None; anything else stays text."""
    token = str(text).strip()
    low = token.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(token):
        return int(token)
    if _FLOAT.match(token):
        return float(token)
    return token


def parse_key_value(text: str, what: str = "option") -> tuple[str, Any]:
    """``"key=value"`` -> ``("key", parse_scalar("value"))``; dashes in the key become underscores."""
    if "=" not in str(text):
        raise ConfigError(f"{what}: expected KEY=VALUE, got {text!r}")
    key, value = str(text).split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"{what}: the key of {text!r} is empty; expected KEY=VALUE")
    return key, parse_scalar(value)


def parse_key_values(items: Iterable[str] | None, what: str = "option", *, split_commas: bool = False) -> dict:
    """``["k=v", "a=1,b=2"]`` -> ``{"k": "v", "a": 1, "b": 2}`` (commas split items with ``split_commas``)."""
    out: dict[str, Any] = {}
    for item in items or ():
        parts = str(item).split(",") if split_commas else [str(item)]
        for part in parts:
            if part.strip():
                key, value = parse_key_value(part, what)
                out[key] = value
    return out


def read_structured_file(path: str | Path, what: str = "file") -> Any:
    """The data of a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file; any problem is a ConfigError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
    except Exception as exc:  # yaml, toml and json each raise their own error types
        raise ConfigError(f"{what} {str(path)!r} does not parse: {exc}") from None
    raise ConfigError(f"{what} {str(path)!r}: expected a .yaml, .yml, .toml or .json file")
