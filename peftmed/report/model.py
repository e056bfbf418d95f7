"""``ReportModel``: any VQA model of peftmed (miss, hf-blip-vqa, hf-llava) serving the report task.

The VQA models already generate free text conditioned on an image and a question, so a report is
generated as the answer to a fixed prompt (``"describe the image"`` by default) with report-sized
limits: the model's answer limit is raised to ``max_report_tokens`` for the duration of each call
and restored after. Nothing in the backbones changes, and a recipe applied to the model (a
``PeftModel``) is used as is::

    pm = peftmed.apply(peftmed.build_backbone("miss-tiny", max_position_embeddings=128), "*=layernorm")
    rm = ReportModel(pm)                       # wraps, never copies: pm's adapter is what trains
    loss = rm.compute_loss(batch)              # batch = {"images", "reports", "ids"}
    texts = rm.generate_report(batch, max_new_tokens=100, num_beams=3)

For MISS the report is decoded by its answer decoder from the JTM states of the image and the
prompt. The model says how long a text it takes through ``text_limits(prompt)`` (a
``peftmed.backbones.base.TextLimits``); position limits are respected: a ``max_report_tokens`` or ``max_new_tokens`` beyond what the
model's position embeddings hold is clipped, with a logged note saying how to build a longer model.
``generate`` is ``generate_report``, so code written for the VQA protocol (evaluators) works.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..backbones.base import TextLimits
from ..data.text import detokenize
from ..errors import ConfigError, PeftmedError
from ..model import PeftModel

log = logging.getLogger("peftmed.report")

DEFAULT_PROMPT = "describe the image"
DEFAULT_MAX_REPORT_TOKENS = 100


def task_model(model: nn.Module) -> nn.Module:
    """The backbone model under adapter wrappers (peftmed's ``PeftModel``, peft's ``PeftModel``)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, PeftModel):
            model = model.base_model
        elif hasattr(type(model), "get_base_model"):
            model = model.get_base_model()
        else:
            return model
    return model


def _limits(model: nn.Module, prompt: str) -> TextLimits:
    """What the model says about its text length (``text_limits``), else its integer ``max_answer_tokens``."""
    text_limits = getattr(model, "text_limits", None)
    if callable(text_limits):
        return text_limits(prompt)
    if isinstance(getattr(model, "max_answer_tokens", None), int):
        return TextLimits(model, "max_answer_tokens", 0, None, "")
    raise PeftmedError(
        f"{type(model).__name__} cannot serve the report task: ReportModel needs a VQA model with text_limits(prompt) "
        f"(as peftmed's miss, hf-blip-vqa and hf-llava have) or an integer max_answer_tokens, plus compute_loss and "
        f"generate")


class ReportModel(nn.Module):
    """A VQA model of peftmed (or its PeftModel) generating reports; see the module docstring.

    Args:
      model: the model to wrap (kept as ``.model``; its parameters are this module's parameters).
      prompt: the fixed question the report answers.
      max_report_tokens: longest report, in the model's tokens, used for the loss (longer ones are cut
        and counted by the model); clipped to the position limit with a note.
    """

    def __init__(self, model: nn.Module, prompt: str = DEFAULT_PROMPT,
                 max_report_tokens: int = DEFAULT_MAX_REPORT_TOKENS):
        super().__init__()
        if isinstance(model, ReportModel):
            raise PeftmedError("model is already a ReportModel")
        if not isinstance(max_report_tokens, int) or isinstance(max_report_tokens, bool) or max_report_tokens < 1:
            raise ConfigError(f"max_report_tokens must be a positive integer, got {max_report_tokens!r}")
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {prompt!r}")
        self.model = model
        self.prompt = prompt
        self._limits = _limits(task_model(model), prompt)
        room = self._limits.room
        if room is not None and room < 1:
            raise ConfigError(f"{type(task_model(model)).__name__} has no position left for a report after the "
                              f"prompt; {self._limits.hint}")
        if room is not None and max_report_tokens > room:
            log.warning("max_report_tokens=%d exceeds what %s's position embeddings hold; clipped to %d (%s)",
                        max_report_tokens, type(task_model(model)).__name__, room, self._limits.hint)
            max_report_tokens = room
        self.max_report_tokens = max_report_tokens
        self.clipped_generations = 0  # generate calls whose max_new_tokens was clipped to the position limit

    def __getattr__(self, name: str):
        # image_size, tokenizer, save_adapter, trainable_report ... come from the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- the report task protocol ------------------------------------------------------------------
    def _vqa_batch(self, batch, with_reports: bool) -> dict:
        if "images" not in batch:
            raise PeftmedError(f"a report batch needs 'images'; it has {sorted(batch)}")
        n = batch["images"].shape[0]
        out = {"images": batch["images"], "questions": [self.prompt] * n,
               "qids": list(batch.get("ids") or batch.get("qids") or range(n))}
        if with_reports:
            reports = batch.get("reports")
            if reports is None or isinstance(reports, str) or len(reports) != n:
                raise PeftmedError(f"the report loss needs batch['reports'], a list of {n} strings (one per image); "
                                   f"got {type(reports).__name__ if reports is not None else 'none'}")
            out["answers"] = [str(r) for r in reports]
        return out

    @contextlib.contextmanager
    def _answer_limit(self, tokens: int):
        owner, attr = self._limits.owner, self._limits.attr
        before = getattr(owner, attr)
        setattr(owner, attr, tokens + self._limits.specials)
        try:
            yield
        finally:
            setattr(owner, attr, before)

    def compute_loss(self, batch) -> torch.Tensor:
        """Cross-entropy of the report tokens given the image and the prompt (the model's answer loss)."""
        with self._answer_limit(self.max_report_tokens):
            return self.model.compute_loss(self._vqa_batch(batch, with_reports=True))

    @property
    def loss_terms(self):
        """``loss_terms(batch) -> (sum of the report tokens' cross-entropy, their number)`` when the wrapped
        model has it (None otherwise: the trainer then averages ``compute_loss`` per micro-batch)."""
        terms = getattr(self.model, "loss_terms", None)
        if not callable(terms):
            return None

        def loss_terms(batch) -> tuple[torch.Tensor, int]:
            with self._answer_limit(self.max_report_tokens):
                return terms(self._vqa_batch(batch, with_reports=True))

        return loss_terms

    def forward(self, batch) -> torch.Tensor:
        """The training loss (DDP/FSDP wrappers call forward)."""
        return self.compute_loss(batch)

    @torch.no_grad()
    def generate_report(self, batch, max_new_tokens: int = DEFAULT_MAX_REPORT_TOKENS, num_beams: int = 3) -> list[str]:
        """One report per image, by beam search (``num_beams=1``: greedy) of at most ``max_new_tokens``."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1 or not isinstance(num_beams, int) or num_beams < 1:
            raise ConfigError(f"max_new_tokens and num_beams must be positive integers, got {max_new_tokens!r} "
                              f"and {num_beams!r}")
        room = self._limits.room
        if room is not None and max_new_tokens > room + 1:  # + 1: the end token needs no position of its own
            if not self.clipped_generations:
                log.warning("max_new_tokens=%d exceeds the position limit of %s; generating at most %d tokens (%s)",
                            max_new_tokens, type(task_model(self.model)).__name__, room + 1, self._limits.hint)
            self.clipped_generations += 1
            max_new_tokens = room + 1
        was_training = self.training
        self.eval()  # generation is deterministic: no dropout, whatever mode the caller left the model in
        try:
            with self._answer_limit(self.max_report_tokens):
                texts = self.model.generate(self._vqa_batch(batch, with_reports=False),
                                            max_new_tokens=max_new_tokens, num_beams=num_beams)
        finally:
            self.train(was_training)
        return [detokenize(t) for t in texts]  # the models' decoders already did; idempotent

    def generate(self, batch, max_new_tokens: int = DEFAULT_MAX_REPORT_TOKENS, num_beams: int = 3) -> list[str]:
        return self.generate_report(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)
