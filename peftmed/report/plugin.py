"""The report-generation task as a plugin: registers the task ``report``, its datasets ``iu-xray``,
``mimic-cxr`` and ``phantom-report``, and the metric ``report`` (the same hooks a third party uses)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..metrics import MetricSpec
from .datasets import SPECS
from .metrics import report_scores
from .task import REPORT


@hookimpl
def register_tasks(register):
    register(REPORT)


@hookimpl
def register_datasets(register):
    for spec in SPECS:
        register(spec)


@hookimpl
def register_metrics(register):
    register(MetricSpec(
        name="report",
        compute=report_scores,
        description="BLEU-1..4, ROUGE-L, METEOR (exact match), CIDEr by id; findings P/R/F1 on phantom reports",
    ))
