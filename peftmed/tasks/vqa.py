"""The Med-VQA task (a built-in plugin): questions about an image, answered by generation, scored by qid.

Records are ``peftmed.data.VQARecord``s; batches come from ``VQADataset`` + ``collate``; the score is the
registered ``vqa`` metric (ACC closed / open / overall, closed P/R/F1, open token F1); the baseline is
the most frequent training answer per answer type.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import ScoreColumn, Task


def _texts(records) -> list[str]:
    return [r.question for r in records] + [r.answer for r in records]


def _summary(scores: dict) -> str:
    def pct(key):
        return "-" if scores.get(key) is None else f"{100 * scores[key]:.1f}"

    return (f"ACC closed {pct('acc_closed')}  open {pct('acc_open')}  overall {pct('acc_overall')}  "
            f"(n={scores.get('n')}: {scores.get('n_closed')} closed, {scores.get('n_open')} open)")


def _dataset(records, image_size, cache_dir=None):
    from ..data import VQADataset

    return VQADataset(records, int(image_size), cache_dir=cache_dir)


def _collate(items):
    from ..data import collate

    return collate(items)


def _baseline(train_records, test_records):
    from ..data import majority_baseline

    return majority_baseline(train_records, test_records)


def _record_scores(predictions, records):
    from ..metrics import question_scores

    return question_scores(predictions, records)


def _write(path, predictions, records):
    from ..metrics import write_predictions

    return write_predictions(path, predictions, records)


VQA = Task(
    name="vqa",
    description="Med-VQA: answer a question about an image (ACC closed/open/overall by qid)",
    noun="questions",
    metric="vqa",
    columns=(ScoreColumn("acc_closed", "closed"), ScoreColumn("acc_open", "open"),
             ScoreColumn("acc_overall", "overall"), ScoreColumn("closed_f1", "closed F1"),
             ScoreColumn("open_token_f1", "open tok-F1")),
    primary="acc_overall",
    max_new_tokens=10,
    dataset=_dataset,
    collate=_collate,
    texts=_texts,
    baseline=_baseline,
    baseline_name="majority_baseline",
    baseline_label="majority-answer baseline:",
    summary=_summary,
    write_predictions=_write,
    record_scores=_record_scores,
    binary=True,
    default_dataset="phantom",
    targets=lambda records: [r.answer for r in records],
)


@hookimpl
def register_tasks(register):
    register(VQA)
