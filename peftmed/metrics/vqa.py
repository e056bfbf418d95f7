"""Med-VQA scores as the field reports them, with predictions matched to questions BY QID.

The public reference script paired predictions with answers by list order, so one dropped or
reordered line silently shifted every score; here a prediction for an unknown qid, or a question
without a prediction, is an error naming the qid.

All scores are fractions in [0, 1]; a score over an empty group (e.g. no OPEN question) is None.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import PeftmedError
from ..files import write_json_atomic
from ..data.records import VQARecord, check_unique_qids, normalize_answer

POSITIVE_CLASS = "yes"  # closed-question precision/recall/F1 treat "yes" as the positive class


class MetricError(PeftmedError, ValueError):
    """Predictions that cannot be scored against the records (unknown or missing qids...)."""


def match_predictions(predictions: Mapping[str, str], records: Sequence[VQARecord]) -> list[tuple[VQARecord, str]]:
    """Pair every record with its prediction by qid; unknown or missing qids are errors."""
    check_unique_qids(records, "scored records")
    preds: dict[str, str] = {}
    for k, v in predictions.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise MetricError(f"prediction keys must be qids (text or integers), got {k!r}")
        key = str(k)
        if key in preds:
            raise MetricError(f"predictions hold the qid {key!r} twice (as {k!r} and as another key that reads the "
                              f"same, e.g. 680 and '680'); one prediction per question")
        preds[key] = v
    known = {r.qid for r in records}
    unknown = sorted(set(preds) - known)
    if unknown:
        raise MetricError(
            f"{len(unknown)} prediction(s) for qid(s) not in the records: {_few(unknown)}; "
            "predictions must be keyed by the qid of a scored question"
        )
    missing = [r.qid for r in records if r.qid not in preds]
    if missing:
        raise MetricError(f"{len(missing)} question(s) have no prediction: qid(s) {_few(missing)}")
    bad = [q for q, p in preds.items() if not isinstance(p, str)]
    if bad:
        raise MetricError(f"predictions must be strings; qid {bad[0]!r} has {type(preds[bad[0]]).__name__}")
    return [(r, preds[r.qid]) for r in records]


def _few(items: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def tokens(text: str) -> list[str]:
    """Word tokens of a normalised answer ("4.5 cm" -> ["4", "5", "cm"])."""
    return re.findall(r"\w+", normalize_answer(text))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token overlap F1 (multiset); two empty answers agree fully."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred:
        return 0.0
    clipped = sum((Counter(pred) & Counter(ref)).values())
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * clipped / len(pred)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _prf(pairs: Sequence[tuple[str, str]]) -> tuple[float | None, float | None, float | None]:
    """Precision, recall, F1 of normalised (prediction, reference) pairs; positive class "yes"."""
    if not pairs:
        return None, None, None
    tp = sum(p == POSITIVE_CLASS and r == POSITIVE_CLASS for p, r in pairs)
    fp = sum(p == POSITIVE_CLASS and r != POSITIVE_CLASS for p, r in pairs)
    fn = sum(p != POSITIVE_CLASS and r == POSITIVE_CLASS for p, r in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _breakdown(rows: Sequence[tuple[VQARecord, bool]], key: str) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for rec, correct in rows:
        groups[getattr(rec, key) or "(none)"].append(correct)
    return {g: {"n": len(v), "acc": sum(v) / len(v)} for g, v in sorted(groups.items())}


def question_scores(predictions: Mapping[str, str], records: Sequence[VQARecord]) -> dict[str, float]:
    """Per question (by qid): 1.0 when the normalised prediction equals the normalised answer, else 0.0; their
    mean is ``acc_overall`` (what the bench's confidence intervals and paired tests use)."""
    return {rec.qid: float(normalize_answer(pred) == normalize_answer(rec.answer))
            for rec, pred in match_predictions(predictions, records)}


def vqa_scores(predictions: Mapping[str, str], records: Sequence[VQARecord]) -> dict:
    """Score ``predictions`` (qid -> answer text) against ``records``.

    Returns ``n, n_closed, n_open, acc_closed, acc_open, acc_overall`` (exact match after
    ``normalize_answer``), ``closed_precision, closed_recall, closed_f1`` (over CLOSED questions,
    positive class "yes", every other answer negative), ``open_token_f1, open_bleu1`` (means over OPEN
    questions), and ``by_question_type`` / ``by_organ``: group -> {"n", "acc"}.
    """
    matched = match_predictions(predictions, records)
    rows, closed_pairs, open_f1, open_bleu = [], [], [], []
    for rec, pred in matched:
        p, r = normalize_answer(pred), normalize_answer(rec.answer)
        rows.append((rec, p == r))
        if rec.answer_type == "CLOSED":
            closed_pairs.append((p, r))
        else:
            open_f1.append(token_f1(pred, rec.answer))
            open_bleu.append(bleu1(pred, rec.answer))
    closed = [c for rec, c in rows if rec.answer_type == "CLOSED"]
    opened = [c for rec, c in rows if rec.answer_type == "OPEN"]
    precision, recall, f1 = _prf(closed_pairs)
    return {
        "n": len(rows), "n_closed": len(closed), "n_open": len(opened),
        "acc_closed": _mean(closed), "acc_open": _mean(opened), "acc_overall": _mean([c for _, c in rows]),
        "closed_precision": precision, "closed_recall": recall, "closed_f1": f1,
        "open_token_f1": _mean(open_f1), "open_bleu1": _mean(open_bleu),
        "by_question_type": _breakdown(rows, "question_type"),
        "by_organ": _breakdown(rows, "organ"),
    }


def write_predictions(path: str | os.PathLike, predictions: Mapping[str, str],
                      records: Sequence[VQARecord]) -> Path:
    """Write one JSON row per record (qid, question, answer, prediction, answer_type, correct).

    Rows follow the records' order; the file is written to a temp file and renamed, so a crash never
    leaves half a file where a previous one was.
    """
    path = Path(path)
    rows = [
        {"qid": rec.qid, "question": rec.question, "answer": rec.answer, "prediction": pred,
         "answer_type": rec.answer_type, "correct": normalize_answer(pred) == normalize_answer(rec.answer)}
        for rec, pred in match_predictions(predictions, records)
    ]
    return write_json_atomic(path, rows, indent=1, ensure_ascii=False)
