"""The report-generation task: an image in, a free-text report out, scored by id with ``report_scores``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import write_json_atomic
from ..metrics import match_predictions
from ..tasks import ScoreColumn, Task
from .metrics import record_rouge
from .model import DEFAULT_PROMPT, ReportModel
from .records import ReportDataset, report_collate


def training_texts(records) -> list[str]:
    """What a backbone trains its tokenizer on: the prompt and the reports."""
    return [DEFAULT_PROMPT] + [r.report for r in records]


def write_report_predictions(path: str | Path, predictions: dict[str, str], records: Sequence) -> Path:
    """One row per record, in record order: id, reference report, generated report."""
    rows = [{"id": r.id, "reference": r.report, "prediction": p} for r, p in match_predictions(predictions, records)]
    return write_json_atomic(path, rows)


def summary_text(s: dict[str, Any]) -> str:
    def f(key, scale=1.0):
        return "-" if s.get(key) is None else f"{scale * s[key]:.3f}"

    text = (f"BLEU-1 {f('bleu_1')}  BLEU-2 {f('bleu_2')}  BLEU-3 {f('bleu_3')}  BLEU-4 {f('bleu_4')}  "
            f"ROUGE-L {f('rouge_l')}  METEOR {f('meteor')}  CIDEr {f('cider')}")
    if "findings_f1" in s:
        text += f"  findings F1 {f('findings_f1')}  presence acc {f('presence_acc')}"
    return text + f"  (n={s.get('n')})"


def baseline_predictions(train_records: Sequence, test_records: Sequence) -> dict[str, str]:
    """The most frequent training report (ties: the first seen) for every test record: the floor a
    model that ignores the image reaches."""
    if not train_records:
        raise ConfigError("the report baseline needs at least one training record")
    counts = Counter(r.report for r in train_records)
    best = max(counts.items(), key=lambda kv: kv[1])[0]  # max keeps the first of equal counts
    return {r.id: best for r in test_records}


class ReportTask(Task):
    name = "report"
    description = "medical report generation: a free-text report per image (BLEU, ROUGE-L, METEOR, CIDEr)"
    noun = "reports"
    metric = "report"
    columns = (ScoreColumn("bleu_4", "BLEU-4"), ScoreColumn("rouge_l", "ROUGE-L"), ScoreColumn("cider", "CIDEr"),
               ScoreColumn("meteor", "METEOR"), ScoreColumn("findings_f1", "find F1"))
    primary = "rouge_l"
    max_new_tokens = 100
    needs_question = False
    output = "report"
    baseline_name = "most_frequent_report_baseline"
    baseline_label = "most-frequent-report baseline:"
    default_dataset = "phantom-report"
    bench_steps = 300  # only a real budget lets a model learn the report template (docs/report-generation.md)
    bench_batch_size = 16
    bench_eval_samples = 64

    def dataset(self, records, image_size, cache_dir=None):
        return ReportDataset(records, int(image_size), cache_dir=cache_dir)

    def collate(self, items):
        return report_collate(items)

    def texts(self, records) -> list[str]:
        return training_texts(records)

    def baseline(self, train_records, test_records):
        return baseline_predictions(train_records, test_records)

    def summary(self, scores: dict) -> str:
        return summary_text(scores)

    def write_predictions(self, path, predictions, records):
        return write_report_predictions(path, predictions, records)

    def record_scores(self, predictions, records):
        return record_rouge(predictions, records)

    def wrap(self, model):
        return ReportModel(model)


REPORT = ReportTask()
