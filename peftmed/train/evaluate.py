"""Evaluation of Med-VQA: an answer per question, scored by qid through the ``vqa`` metric.

    result = peftmed.train.evaluate(pm, test_records, batch_size=32, num_beams=3)
    print(result.scores["acc_closed"], result.scores["acc_open"], result.scores["acc_overall"])
    result.write("runs/lora")            # predictions.json (qid, question, answer, prediction) + metrics.json

This is the ``vqa`` task's evaluation (``peftmed.tasks.evaluate``); other tasks evaluate the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..plugins import default_registry
from ..tasks import EvalResult, baseline_scores as task_baseline_scores, evaluate as task_evaluate


def evaluate(model: nn.Module, records: Sequence, *, batch_size: int = 16, num_beams: int = 3,
             max_new_tokens: int = 10, image_size: int | None = None, limit: int | None = None,
             progress: bool = False, dataset=None, registry=None) -> EvalResult:
    """Answer every record with ``model.generate`` and score the answers by qid.

    ``limit`` evaluates the first ``limit`` records only (periodic evaluation during training);
    ``dataset`` reuses a ``VQADataset`` over ``records`` (its image cache) instead of building one.
    """
    registry = registry or default_registry()
    return task_evaluate(registry.get("task", "vqa"), model, records, registry=registry, batch_size=batch_size, num_beams=num_beams,
               max_new_tokens=max_new_tokens, image_size=image_size, limit=limit, progress=progress, dataset=dataset)


def baseline_scores(train_records: Sequence, test_records: Sequence, registry=None) -> dict[str, Any]:
    """Scores of the majority-answer baseline (per answer type) on ``test_records``."""
    registry = registry or default_registry()
    return task_baseline_scores(registry.get("task", "vqa"), train_records, test_records, registry)


__all__ = ["EvalResult", "baseline_scores", "evaluate"]
