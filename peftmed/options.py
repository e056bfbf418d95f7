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


TRUE_WORDS = frozenset({"1", "true", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "off"})


def parse_bool(text: Any) -> bool:
    """'true'/'yes'/'1'/'on' -> True, 'false'/'no'/'0'/'off' -> False ('--flag False' means False: the reference
    code got this wrong); anything else is a ConfigError naming it."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ConfigError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")


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


def _yaml_loader():
    """yaml's SafeLoader that refuses a key written twice in one mapping (yaml itself keeps the last silently,
    so a duplicated option would override the first without a word)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: yaml reports it below
                    duplicate = False
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is written twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                try:
                    seen.add(key)
                except TypeError:
                    pass
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_structured_file(path: str | Path, what: str = "file") -> Any:
    """The data of a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file; any problem is a ConfigError
    naming the file (a key written twice in a YAML mapping, nesting too deep to read, invalid text)."""
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

            return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{what} {str(path)!r} is nested too deeply to read (expected a mapping of option: "
                          f"value)") from None
    except Exception as exc:  # yaml, toml and json each raise their own error types
        raise ConfigError(f"{what} {str(path)!r} does not parse: {exc}") from None
    raise ConfigError(f"{what} {str(path)!r}: expected a .yaml, .yml, .toml or .json file")
