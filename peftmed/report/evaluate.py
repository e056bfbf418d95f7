"""Evaluation of report generation: a report per record, scored by id through ``report_scores``.

    result = evaluate_reports(ReportModel(pm), test_records, batch_size=16, num_beams=3, max_new_tokens=100)
    print(result.summary())            # BLEU-1..4, ROUGE-L, METEOR, CIDEr (+ findings F1 on phantom)
    result.write("runs/irg")           # predictions.json (id, reference, prediction) + metrics.json
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


@dataclass
class ReportEvalResult:
    predictions: dict[str, str]  # record id -> generated report
    scores: dict[str, Any]
    records: list

    def write(self, folder: str | Path, prefix: str = "") -> tuple[Path, Path]:
        from ..train.checkpoint import write_json_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"id": r.id, "reference": r.report, "prediction": self.predictions[r.id]} for r in self.records]
        preds, metrics = folder / f"{prefix}predictions.json", folder / f"{prefix}metrics.json"
        write_json_atomic(preds, rows)
        write_json_atomic(metrics, self.scores)
        return preds, metrics

    def summary(self) -> str:
        return summary_text(self.scores)


def summary_text(s: dict[str, Any]) -> str:
    def f(key, scale=1.0):
        return "-" if s.get(key) is None else f"{scale * s[key]:.3f}"

    text = (f"BLEU-1 {f('bleu_1')}  BLEU-2 {f('bleu_2')}  BLEU-3 {f('bleu_3')}  BLEU-4 {f('bleu_4')}  "
            f"ROUGE-L {f('rouge_l')}  METEOR(exact) {f('meteor')}  CIDEr {f('cider')}")
    if "findings_f1" in s:
        text += f"  findings F1 {f('findings_f1')}  presence acc {f('presence_acc')}"
    return text + f"  (n={s.get('n')})"


@torch.no_grad()
def evaluate_reports(model, records: Sequence, *, batch_size: int = 16, num_beams: int = 3,
                     max_new_tokens: int = 100, limit: int | None = None, dataset=None,
                     progress: bool = False) -> ReportEvalResult:
    """Generate a report for each record (the first ``limit`` ones) and score them by id."""
    from torch.utils.data import DataLoader, Subset

    from .metrics import report_scores
    from .records import ReportDataset, report_collate

    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size, num_beams and max_new_tokens must be >= 1, got {batch_size}, {num_beams}, "
                          f"{max_new_tokens}")
    records = list(records)
    if not records:
        raise ConfigError("nothing to evaluate: the record list is empty")
    if dataset is None:
        dataset = ReportDataset(records, int(model.image_size))
    n = len(records) if limit is None else min(limit, len(records))
    records = records[:n]
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, collate_fn=report_collate)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="reports", unit="report", dynamic_ncols=True)
    try:
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            texts = model.generate_report(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)
            if len(texts) != len(batch["ids"]):
                raise ConfigError(f"{type(model).__name__}.generate_report returned {len(texts)} reports for "
                                  f"{len(batch['ids'])} images")
            predictions.update(zip(batch["ids"], texts))
            if bar is not None:
                bar.update(len(texts))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return ReportEvalResult(predictions, report_scores(predictions, records), records)


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
