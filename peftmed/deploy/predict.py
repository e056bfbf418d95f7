"""Ask a fine-tuned model: rebuild the adapter's run exactly as training built it, then answer questions
about images (or write reports).

The base model comes from the run folder the adapter sits in (``train_config.json``: backbone, builder
options, seed, ``--pretrained`` checkpoint, base dtype and quantization; ``tokenizer/``: the vocabulary
the run trained), so the frozen weights, the tokenizer and the image size are the training run's.
"""

from __future__ import annotations

from ..run.model import run_options
from ..tasks import answer, image_batch, truncated_questions  # noqa: F401  (the library API, re-exported)


def run_task(adapter) -> str | None:
    """The task the adapter's run trained for (None when it has no run folder)."""
    return run_options(adapter)[1].get("task")


def question_limit(model) -> int | None:
    """The model's question length limit in tokens, when it says."""
    for m in model.modules():
        for holder in (m, getattr(m, "config", None)):
            limit = getattr(holder, "max_question_tokens", None)
            if isinstance(limit, int):
                return limit
    return None
