"""Evaluation metrics: Med-VQA accuracy (closed / open / overall, by qid), P/R/F1, token F1, BLEU-1.

    from peftmed.metrics import vqa_scores, write_predictions
    scores = vqa_scores({"q1": "yes", ...}, test_records)
    print(scores["acc_closed"], scores["acc_open"], scores["acc_overall"])

Metrics are plugins (``register_metrics`` hook, ``MetricSpec``); ``peftmed.metrics.plugin`` registers
the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .vqa import (POSITIVE_CLASS, MetricError, bleu1, match_predictions, question_scores, token_f1, vqa_scores,
                  write_predictions)


@dataclass
class MetricSpec:
    """A registered metric: ``compute(predictions: dict[qid, str], records) -> dict``."""

    name: str
    compute: Callable[..., dict]
    description: str = ""


__all__ = [
    "POSITIVE_CLASS", "MetricError", "MetricSpec", "bleu1", "match_predictions", "question_scores", "token_f1",
    "vqa_scores", "write_predictions",
]
