"""Ask a fine-tuned model: rebuild the adapter's run exactly as training built it, then answer questions
about images (or write reports).

The base model comes from the run folder the adapter sits in (``train_config.json``: backbone, builder
options, seed, ``--pretrained`` checkpoint, base dtype and quantization; ``tokenizer/``: the vocabulary
the run trained), so the frozen weights, the tokenizer and the image size are the training run's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image

from ..data.dataset import image_to_tensor
from ..data.images import open_image
from ..errors import ConfigError
from ..memory import autocast_for
from ..model import find_peft_model
from ..run.model import run_options
from ..tasks import check_generation_length

log = logging.getLogger("peftmed.predict")


def run_task(adapter) -> str | None:
    """The task the adapter's run trained for (None when it has no run folder)."""
    return run_options(adapter)[1].get("task")


def image_batch(images: Sequence, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size) from image paths, PIL images or uint8 (3, H, W) tensors, prepared as the
    training data was (RGB, bicubic resize); a missing or unreadable file is an error naming it."""
    out = []
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ConfigError(f"image {i}: a tensor image must be uint8 (3, H, W), got {image.dtype} "
                                  f"{tuple(image.shape)}")
            image = Image.fromarray(image.expand(3, -1, -1).permute(1, 2, 0).numpy())
        elif not isinstance(image, Image.Image):
            image = open_image(image, what=f"image {i}")
        out.append(image_to_tensor(image, size))
    return torch.stack(out)


def _question_limit(model) -> int | None:
    """The model's question length limit in tokens, when it says."""
    for m in model.modules():
        for holder in (m, getattr(m, "config", None)):
            limit = getattr(holder, "max_question_tokens", None)
            if isinstance(limit, int):
                return limit
    return None


def _truncated(model) -> int:
    # the model's own counter (vars: a wrapper forwarding attribute reads would count it twice)
    return sum(int(vars(m).get("truncated_questions", 0) or 0) for m in model.modules())


def answer(task, model, images: Sequence, questions: Sequence[str] | None = None, *, batch_size: int = 16,
           num_beams: int = 3, max_new_tokens: int | None = None) -> tuple[list[str], int]:
    """The model's answers (reports for the report task) to ``questions`` about ``images``, in order, and how
    many questions were longer than the model's limit (cut to it; the answer is to the cut question)."""
    if questions is None:
        questions = [""] * len(images)
    if len(questions) != len(images):
        raise ConfigError(f"{len(images)} images but {len(questions)} questions")
    if task.name == "vqa":
        empty = [i for i, q in enumerate(questions) if not str(q).strip()]
        if empty:
            raise ConfigError(f"question {empty[0]} is empty; every image needs a question")
    for key, value in (("batch_size", batch_size), ("num_beams", num_beams)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")

    size = int(getattr(model, "image_size"))
    device = next(model.parameters()).device
    peft = find_peft_model(model)
    tokens = max_new_tokens or getattr(peft, "generation_length", None) or task.max_new_tokens
    check_generation_length(model, tokens)
    before = _truncated(model)
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        pixels = image_batch(images[chunk], size).to(device)
        qs = [str(q) for q in questions[chunk]]
        batch = {"images": pixels, "questions": qs, "qids": [str(i) for i in range(start, start + len(qs))]}
        with torch.no_grad(), autocast_for(model, device):
            out += task.generate(model, batch, tokens, num_beams)
    return out, _truncated(model) - before
