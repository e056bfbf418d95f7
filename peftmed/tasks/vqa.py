"""The Med-VQA task (a built-in plugin): questions about an image, answered by generation, scored by qid.

Records are ``peftmed.data.VQARecord``s; batches come from ``VQADataset`` + ``collate``; the score is the
registered ``vqa`` metric (ACC closed / open / overall, closed P/R/F1, open token F1); the baseline is
the most frequent training answer per answer type.
"""

from __future__ import annotations

from ..data import VQADataset, collate, majority_baseline
from ..hookspecs import hookimpl
from ..metrics import question_scores, write_predictions
from . import ScoreColumn, Task


class VQATask(Task):
    name = "vqa"
    description = "Med-VQA: answer a question about an image (ACC closed/open/overall by qid)"
    noun = "questions"
    metric = "vqa"
    columns = (ScoreColumn("acc_closed", "closed"), ScoreColumn("acc_open", "open"),
               ScoreColumn("acc_overall", "overall"), ScoreColumn("closed_f1", "closed F1"),
               ScoreColumn("open_token_f1", "open tok-F1"))
    primary = "acc_overall"
    max_new_tokens = 10
    baseline_name = "majority_baseline"
    baseline_label = "majority-answer baseline:"
    binary = True
    default_dataset = "phantom"

    def dataset(self, records, image_size, cache_dir=None):
        return VQADataset(records, int(image_size), cache_dir=cache_dir)

    def collate(self, items):
        return collate(items)

    def texts(self, records) -> list[str]:
        return [r.question for r in records] + [r.answer for r in records]

    def baseline(self, train_records, test_records):
        return majority_baseline(train_records, test_records)

    def summary(self, scores: dict) -> str:
        def pct(key):
            return "-" if scores.get(key) is None else f"{100 * scores[key]:.1f}"

        return (f"ACC closed {pct('acc_closed')}  open {pct('acc_open')}  overall {pct('acc_overall')}  "
                f"(n={scores.get('n')}: {scores.get('n_closed')} closed, {scores.get('n_open')} open)")

    def write_predictions(self, path, predictions, records):
        return write_predictions(path, predictions, records)

    def record_scores(self, predictions, records):
        return question_scores(predictions, records)

    def targets(self, records) -> list[str]:
        return [r.answer for r in records]


VQA = VQATask()


@hookimpl
def register_tasks(register):
    register(VQA)
