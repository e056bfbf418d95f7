"""Evaluation: generate an answer for every record, score by qid through ``peftmed.metrics``.

    result = peftmed.train.evaluate(pm, test_records, batch_size=32, num_beams=3)
    print(result.scores["acc_closed"], result.scores["acc_open"], result.scores["acc_overall"])
    result.write("runs/lora")            # predictions.json (qid, question, answer, prediction) + metrics.json
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class EvalResult:
    """Predictions (qid -> answer text) and the scores of ``peftmed.metrics.vqa_scores``."""

    predictions: dict[str, str]
    scores: dict[str, Any]
    records: list

    def write(self, folder: str | Path, prefix: str = "") -> tuple[Path, Path]:
        """Write ``<prefix>predictions.json`` and ``<prefix>metrics.json`` into ``folder``."""
        from ..metrics import write_predictions
        from .checkpoint import write_json_atomic

        folder = Path(folder)
        preds = write_predictions(folder / f"{prefix}predictions.json", self.predictions, self.records)
        metrics = folder / f"{prefix}metrics.json"
        write_json_atomic(metrics, self.scores)
        return preds, metrics

    def summary(self) -> str:
        s = self.scores

        def pct(key):
            return "-" if s.get(key) is None else f"{100 * s[key]:.1f}"

        return (f"ACC closed {pct('acc_closed')}  open {pct('acc_open')}  overall {pct('acc_overall')}  "
                f"(n={s.get('n')}: {s.get('n_closed')} closed, {s.get('n_open')} open)")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, records: Sequence, *, batch_size: int = 16, num_beams: int = 3,
             max_new_tokens: int = 10, image_size: int | None = None, limit: int | None = None,
             progress: bool = False, dataset=None) -> EvalResult:
    """Answer every record with ``model.generate`` and score the answers by qid.

    ``limit`` evaluates the first ``limit`` records only (periodic evaluation during training);
    ``dataset`` reuses a ``VQADataset`` over ``records`` (its image cache) instead of building one.
    """
    from torch.utils.data import DataLoader

    from ..data import VQADataset, collate
    from ..metrics import vqa_scores

    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size, num_beams and max_new_tokens must be >= 1, got {batch_size}, "
                          f"{num_beams}, {max_new_tokens}")
    records = list(records)
    if not records:
        raise ConfigError("nothing to evaluate: the record list is empty")
    if dataset is None:
        size = image_size or getattr(model, "image_size", None)
        if size is None:
            raise ConfigError(f"{type(model).__name__} has no image_size; pass image_size=")
        dataset = VQADataset(records, int(size))
    indices = list(range(len(records) if limit is None else min(limit, len(records))))
    records = records[: len(indices)]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate)
    device = _device(model)
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(indices), desc="eval", unit="q", dynamic_ncols=True)
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            answers = model.generate(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)
            if len(answers) != len(batch["qids"]):
                raise ConfigError(f"{type(model).__name__}.generate returned {len(answers)} answers for a batch "
                                  f"of {len(batch['qids'])} questions")
            predictions.update(zip(batch["qids"], answers))
            if bar is not None:
                bar.update(len(answers))
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    return EvalResult(predictions, vqa_scores(predictions, records), records)


def baseline_scores(train_records: Sequence, test_records: Sequence) -> dict[str, Any]:
    """Scores of the majority-answer baseline (per answer type) on ``test_records``."""
    from ..data import majority_baseline
    from ..metrics import vqa_scores

    return vqa_scores(majority_baseline(train_records, test_records), test_records)
