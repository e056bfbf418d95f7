"""Imported once by the bench's fork server: everything a job needs is imported (and the registry built)
before any job is forked, so each job's process starts with it instead of paying for it (about 2 s a job:
transformers' model modules, peft, the plugins)."""

from __future__ import annotations

import importlib

from ..errors import PeftmedError
from ..interop.peft_format import import_peft
from .worker import preload

preload()
try:
    import_peft()
except PeftmedError:  # optional: peft is a baseline
    pass
for _name in ("transformers.models.blip.modeling_blip", "transformers.models.llava.modeling_llava"):
    try:
        importlib.import_module(_name)
    except ImportError:  # optional: peft is a baseline, the hf backbones need transformers' modules
        pass
