"""``peftmed plugin new``: write a ready-to-install plugin package from a template.

    peftmed plugin new my-method --kind method --dir plugins/
    pip install --no-build-isolation --no-deps -e plugins/peftmed-plugin-my-method
    pytest plugins/peftmed-plugin-my-method/tests     # runs the conformance kit

The package holds a pyproject.toml (entry point in group ``peftmed``), a module with the hook
implementation, a README, and a test that runs the conformance kit. Nothing is ever overwritten: an
existing target folder is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, PeftmedError
from . import templates

KINDS = ("method", "backbone", "kernel", "dataset")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
PREFIX = "peftmed-plugin-"


def names_for(name: str) -> dict[str, str]:
    """The distribution, module and registry names derived from NAME (``my-method``)."""
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not _NAME.match(short):
        raise ConfigError(
            f"plugin name {name!r} is not valid: use lower-case letters, digits and single hyphens, "
            f"starting with a letter (e.g. 'my-method')"
        )
    words = short.split("-")
    return {
        "short": short,  # registry name of what the plugin adds
        "distribution": PREFIX + short,
        "module": "peftmed_" + "_".join(words),
        "cls": "".join(w.title() for w in words),  # class-name stem
    }


def create_plugin(name: str, kind: str, directory: str | Path = ".") -> Path:
    """Write the package ``peftmed-plugin-NAME`` under ``directory``; returns its folder."""
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
    n = names_for(name)
    root = Path(directory) / n["distribution"]
    if root.exists():
        raise PeftmedError(f"{str(root)!r} already exists; nothing was written. Choose another name or --dir")
    files = templates.render(kind, n)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
