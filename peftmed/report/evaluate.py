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

from ..errors import ConfigError
from ..tasks import EvalResult


def write_report_predictions(path: str | Path, predictions: dict[str, str], records: Sequence) -> Path:
    """One row per record, in record order: id, reference report, generated report."""
    from ..files import write_json_atomic
    from ..metrics import match_predictions

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


def evaluate_reports(model, records: Sequence, *, batch_size: int = 16, num_beams: int = 3,
                     max_new_tokens: int = 100, limit: int | None = None, dataset=None, progress: bool = False,
                     registry=None) -> EvalResult:
    """Generate a report for each record (the first ``limit`` ones) and score them by id: the report task's
    evaluation (``peftmed.tasks.evaluate``)."""
    from ..tasks import evaluate
    from .plugin import REPORT

    return evaluate(REPORT, model, records, registry=registry, batch_size=batch_size, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, limit=limit, dataset=dataset, progress=progress)


ReportEvalResult = EvalResult  # the result every task returns (predictions, scores, records; write, summary)


def load_predictions(path: str | Path) -> dict[str, str]:
    """Read a ``predictions.json`` written by ``ReportEvalResult.write`` back to id -> report."""
    rows = json.loads(Path(path).read_text())
    return {str(r["id"]): r["prediction"] for r in rows}


def baseline_predictions(train_records: Sequence, test_records: Sequence) -> dict[str, str]:
    """The most frequent training report (ties: the first seen) for every test record: the floor a
    model that ignores the image reaches."""
    from collections import Counter

    if not train_records:
        raise ConfigError("the report baseline needs at least one training record")
    counts = Counter(r.report for r in train_records)
    best = max(counts.items(), key=lambda kv: kv[1])[0]  # max keeps the first of equal counts
    return {r.id: best for r in test_records}


def baseline_scores(train_records: Sequence, test_records: Sequence) -> dict[str, Any]:
    from .metrics import report_scores

    return report_scores(baseline_predictions(train_records, test_records), list(test_records))
