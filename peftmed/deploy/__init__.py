"""Using a trained adapter: ask the model (``predict``: an image and a question in, an answer out) and ship
it (``merge``: the adapter folded into the base weights, written as a model folder that loads without
peftmed). The commands are ``peftmed predict`` and ``peftmed merge``; the library API is
:func:`load_adapted`, :func:`answer` and ``PeftModel.answer``.
"""

from __future__ import annotations

from ..run.model import load_adapted
from .predict import answer, image_batch

__all__ = ["answer", "image_batch", "load_adapted"]
