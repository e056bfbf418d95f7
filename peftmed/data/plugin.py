"""Built-in datasets plugin: registers ``vqa-rad``, ``slake`` and ``phantom``."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import phantom, slake, vqa_rad


@hookimpl
def register_datasets(register):
    for module in (vqa_rad, slake, phantom):
        register(module.SPEC)
