"""Report-generation plugin: registers the datasets ``iu-xray``, ``mimic-cxr``, ``phantom-report``
(task ``report``) and the metric ``report``."""

from __future__ import annotations

from ..hookspecs import hookimpl


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
