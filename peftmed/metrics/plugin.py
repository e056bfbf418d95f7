"""Built-in metrics plugin: registers ``vqa`` (``peftmed.metrics.vqa_scores``)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import MetricSpec
from .vqa import vqa_scores


@hookimpl
def register_metrics(register):
    register(MetricSpec(
        name="vqa",
        compute=vqa_scores,
        description="ACC closed/open/overall by qid, closed P/R/F1 (positive 'yes'), open token F1 and BLEU-1",
    ))
