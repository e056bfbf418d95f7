"""Instruction-format data (the MILE paper's data-level method), with a guard against test leakage.

Each question is rendered through a template drawn (per sample, seeded) from a pool; closed questions
list their answer options, open ones a shuffled set of candidates: the answer plus distractors drawn
from the training answers. The public reference instruction data mixed VQA-RAD test questions into
training; ``render`` therefore requires the test records and refuses (``LeakError``, naming the qids)
to build training data sharing a qid, or an image and normalised question, with them. The standard
VQA-RAD split itself repeats three test questions (same image, same text) in its training set;
``on_leak="drop"`` removes such training records (logged, named) instead of failing.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from .records import DataError, VQARecord, normalize_answer, question_key, test_questions_in

log = logging.getLogger("peftmed.data")

DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "CLOSED": (
        "Question: {question} Options: {options}. Answer:",
        "{question} Choose one of: {options}.",
        "Look at the image and answer with one of {options}. {question}",
        "You are a radiologist. {question} Reply {options}.",
        "Based on the medical image, {question} ({options})",
    ),
    "OPEN": (
        "Question: {question} Candidates: {options}. Answer:",
        "{question} Possible answers include: {options}.",
        "Answer the question about this radiology image. {question} Options: {options}.",
        "You are a radiologist. {question} Pick from: {options}.",
        "Based on the medical image, {question} (e.g. {options})",
    ),
}
YES_NO = ("yes", "no")


class LeakError(DataError):
    """Training data that contains test questions."""


def find_leaks(train_records: Sequence[VQARecord], test_records: Sequence[VQARecord]) -> list[str]:
    """qids of training records that are test questions: same qid, or same image and question text."""
    return test_questions_in(train_records, test_records)


def check_no_leak(train_records: Sequence[VQARecord], test_records: Sequence[VQARecord]) -> None:
    """Raise ``LeakError`` naming every training qid that is also a test question."""
    leaked = find_leaks(train_records, test_records)
    if leaked:
        test_of = {r.qid: r.qid for r in test_records} | {question_key(r): r.qid for r in test_records}
        by_qid = {r.qid: r for r in train_records}
        pairs = [f"{q!r} (test {test_of.get(q) or test_of[question_key(by_qid[q])]!r})" for q in leaked[:20]]
        shown = ", ".join(pairs) + (" ..." if len(leaked) > 20 else "")
        raise LeakError(
            f"{len(leaked)} training record(s) are test questions (same qid, or same image and question): "
            f"qid(s) {shown}. Remove them, or pass on_leak='drop' to drop them from the training data."
        )


def _templates(templates) -> dict[str, tuple[str, ...]]:
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str) or not isinstance(templates, (Mapping, Sequence)):
        raise ConfigError(f"templates must be a list of strings or {{'CLOSED': [...], 'OPEN': [...]}}, got {templates!r}")
    table = dict(templates) if isinstance(templates, Mapping) else {"CLOSED": templates, "OPEN": templates}
    for kind in ("CLOSED", "OPEN"):
        pool = tuple(table.get(kind, ()))
        if not pool:
            raise ConfigError(f"no {kind} templates given; templates must cover CLOSED and OPEN questions")
        for t in pool:
            if not isinstance(t, str) or "{question}" not in t:
                raise ConfigError(f"template {t!r} must be a string containing '{{question}}'")
        table[kind] = pool
    return table


def render(records: Sequence[VQARecord], templates=None, seed: int = 0, *,
           test_records: Sequence[VQARecord], n_options: int = 4, on_leak: str = "error") -> list[VQARecord]:
    """Render ``records`` (training data) in instruction format; returns new records.

    ``test_records`` (the test split of the same dataset) is required and may not be empty: a training
    record that is a test question raises ``LeakError`` (``on_leak="drop"``: dropped and logged). A
    record's template and options depend only on ``seed`` and its qid, not on the order of ``records``.
    The rendered question replaces ``question``; the original is kept in ``extra["original_question"]``,
    the template index in ``extra["template"]`` and the options in ``extra["options"]``.
    """
    if on_leak not in ("error", "drop"):
        raise ConfigError(f"on_leak must be 'error' or 'drop', got {on_leak!r}")
    if not test_records:
        raise LeakError("instruction data is rendered only against the test split of the dataset it comes from "
                        "(test_records is empty): without it, test questions in the training data cannot be found")
    leaked = set(find_leaks(records, test_records))
    if leaked and on_leak == "error":
        check_no_leak(records, test_records)
    if leaked:
        log.warning("instruction data: dropped %d training record(s) that are test questions: %s",
                    len(leaked), sorted(leaked))
        records = [r for r in records if r.qid not in leaked]
    return _render(records, records, templates, seed, n_options)


def render_questions(records: Sequence[VQARecord], answer_pool: Sequence[VQARecord], templates=None,
                     seed: int = 0, n_options: int = 4) -> list[VQARecord]:
    """Render evaluation ``records`` in the same instruction format, their distractors drawn from the training
    answers ``answer_pool`` (a model trained on instruction data is asked the same way)."""
    if not answer_pool:
        raise ConfigError("render_questions needs the training records to draw distractor answers from")
    return _render(records, answer_pool, templates, seed, n_options)


def _render(records, answer_pool, templates, seed: int, n_options: int) -> list[VQARecord]:
    if not isinstance(n_options, int) or n_options < 2:
        raise ConfigError(f"n_options must be an int >= 2 (answer plus distractors), got {n_options!r}")
    pool = _templates(templates)
    # distractor pools, deduplicated and sorted so the draw depends on the seed alone
    answers = {kind: sorted({normalize_answer(r.answer) for r in answer_pool if r.answer_type == kind})
               for kind in ("CLOSED", "OPEN")}
    closed_choices = [a for a in answers["CLOSED"] if a not in YES_NO]
    out = []
    for rec in records:
        rng = random.Random(f"{seed}:{rec.qid}")
        answer = normalize_answer(rec.answer)
        if rec.answer_type == "CLOSED" and answer in YES_NO:
            options = list(YES_NO)
        else:
            candidates = closed_choices if rec.answer_type == "CLOSED" else answers["OPEN"]
            k = 1 if rec.answer_type == "CLOSED" else n_options - 1
            others = [a for a in candidates if a != answer]
            options = [answer] + rng.sample(others, min(k, len(others)))
            rng.shuffle(options)
        index = rng.randrange(len(pool[rec.answer_type]))
        text = pool[rec.answer_type][index].format(question=rec.question.strip(), options=", ".join(options))
        extra = {**rec.extra, "original_question": rec.question, "template": index, "options": options}
        out.append(dataclasses.replace(rec, question=text, extra=extra))
    return out
