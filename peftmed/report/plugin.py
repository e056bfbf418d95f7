"""The report-generation task as a plugin: registers the task ``report``, its datasets ``iu-xray``,
``mimic-cxr`` and ``phantom-report``, and the metric ``report`` (the same hooks a third party uses)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..tasks import ScoreColumn, Task

from .model import DEFAULT_PROMPT  # noqa: E402  (the prompt the ReportModel answers)


def training_texts(records) -> list[str]:
    """What a backbone trains its tokenizer on: the prompt and the reports."""
    return [DEFAULT_PROMPT] + [r.report for r in records]


def _dataset(records, image_size, cache_dir=None):
    from .records import ReportDataset

    return ReportDataset(records, int(image_size), cache_dir=cache_dir)


def _collate(items):
    from .records import report_collate

    return report_collate(items)


def _wrap(model):
    from .model import ReportModel

    return ReportModel(model)


def _baseline(train_records, test_records):
    from .evaluate import baseline_predictions

    return baseline_predictions(train_records, test_records)


def _summary(scores):
    from .evaluate import summary_text

    return summary_text(scores)


def _record_scores(predictions, records):
    from .metrics import record_rouge

    return record_rouge(predictions, records)


def _write(path, predictions, records):
    from .evaluate import write_report_predictions

    return write_report_predictions(path, predictions, records)


REPORT = Task(
    name="report",
    description="medical report generation: a free-text report per image (BLEU, ROUGE-L, METEOR, CIDEr)",
    noun="reports",
    metric="report",
    columns=(ScoreColumn("bleu_4", "BLEU-4"), ScoreColumn("rouge_l", "ROUGE-L"), ScoreColumn("cider", "CIDEr"),
             ScoreColumn("meteor", "METEOR"), ScoreColumn("findings_f1", "find F1")),
    primary="rouge_l",
    max_new_tokens=100,
    dataset=_dataset,
    collate=_collate,
    texts=training_texts,
    baseline=_baseline,
    baseline_name="most_frequent_report_baseline",
    baseline_label="most-frequent-report baseline:",
    summary=_summary,
    write_predictions=_write,
    record_scores=_record_scores,
    wrap=_wrap,
    default_dataset="phantom-report",
    bench_steps=300,  # only a real budget lets a model learn the report template (docs/report-generation.md)
    bench_batch_size=16,
    bench_eval_samples=64,
)


@hookimpl
def register_tasks(register):
    register(REPORT)


@hookimpl
def register_datasets(register):
    from .datasets import SPECS

    for spec in SPECS:
        register(spec)


@hookimpl
def register_metrics(register):
    from ..metrics import MetricSpec
    from .metrics import report_scores

    register(MetricSpec(
        name="report",
        compute=report_scores,
        description="BLEU-1..4, ROUGE-L, METEOR (exact match), CIDEr by id; findings P/R/F1 on phantom reports",
    ))
