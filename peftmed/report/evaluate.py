"""Evaluation of report generation: a report per record, scored by id through ``report_scores``.

    result = evaluate_reports(ReportModel(pm), test_records, batch_size=16, num_beams=3, max_new_tokens=100)
    print(result.summary())            # BLEU-1..4, ROUGE-L, METEOR, CIDEr (+ findings F1 on phantom)
    result.write("runs/irg")           # predictions.json (id, reference, prediction) + metrics.json
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..tasks import EvalResult, evaluate
from .metrics import report_scores
from .task import REPORT, baseline_predictions, summary_text, write_report_predictions  # noqa: F401  (re-exported)


def evaluate_reports(model, records: Sequence, *, batch_size: int = 16, num_beams: int = 3,
                     max_new_tokens: int = 100, limit: int | None = None, dataset=None, progress: bool = False,
                     registry=None) -> EvalResult:
    """Generate a report for each record (the first ``limit`` ones) and score them by id: the report task's
    evaluation (``peftmed.tasks.evaluate``)."""
    return evaluate(REPORT, model, records, registry=registry, batch_size=batch_size, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, limit=limit, dataset=dataset, progress=progress)


ReportEvalResult = EvalResult  # the result every task returns (predictions, scores, records; write, summary)


def load_predictions(path: str | Path) -> dict[str, str]:
    """Read a ``predictions.json`` written by ``ReportEvalResult.write`` back to id -> report."""
    rows = json.loads(Path(path).read_text())
    return {str(r["id"]): r["prediction"] for r in rows}


def baseline_scores(train_records: Sequence, test_records: Sequence) -> dict[str, Any]:
    return report_scores(baseline_predictions(train_records, test_records), list(test_records))
