"""docs/plugins.md documents every hook with its exact signature, and no hook that does not exist."""

import inspect
import re
from pathlib import Path

from peftmed import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def _hooks() -> dict[str, str]:
    return {
        name: f"{name}{inspect.signature(fn)}"
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, f"{hookspecs.PROJECT}_spec")
    }


def test_every_hook_is_documented_with_its_signature():
    text = DOC.read_text()
    hooks = _hooks()
    assert hooks, "no hookspecs found"
    missing = [sig for sig in hooks.values() if f"### `{sig}`" not in text]
    assert not missing, f"docs/plugins.md lacks a '### `signature`' heading for: {missing}"


def test_no_documented_hook_is_stale():
    documented = re.findall(r"^### `(\w+)\(", DOC.read_text(), flags=re.M)
    stale = sorted(set(documented) - set(_hooks()))
    assert not stale, f"docs/plugins.md documents hooks that peftmed.hookspecs does not have: {stale}"


def test_strict_mode_and_selection_are_documented():
    text = DOC.read_text()
    assert "PEFTMED_STRICT_PLUGINS=1" in text and "PEFTMED_PLUGINS=" in text
