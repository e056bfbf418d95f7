"""Medical report generation (Med-IRG): image in, free-text report out.

    from peftmed.data import load_records
    from peftmed.report import ReportModel, ReportDataset, report_collate, evaluate_reports
    train = load_records("phantom-report", "train", n_images=200)       # or iu-xray / mimic-cxr
    model = ReportModel(peftmed.apply(peftmed.build_backbone("miss-tiny", max_position_embeddings=128),
                                      "*=layernorm"))
    loss = model.compute_loss(report_collate([ReportDataset(train, 64)[0]]))
    result = evaluate_reports(model, test, max_new_tokens=100)         # pycocoevalcap BLEU, ROUGE-L, METEOR, CIDEr; F1

The task ``report``, its datasets (``task="report"``) and the ``report`` metric are registered by
``peftmed.report.plugin``; ``peftmed train``, ``eval`` and ``bench --suite irg`` use them through the
registry like any task. See docs/report-generation.md.
"""

from .evaluate import ReportEvalResult, evaluate_reports
from .findings import facts_from_findings, facts_from_text, findings_scores
from .metrics import METRICS_VERSION, caption_scores, java_status, report_scores, tokenize
from .model import DEFAULT_PROMPT, ReportModel, detokenize
from .plugin import REPORT
from .records import ReportDataset, ReportRecord, report_collate

__all__ = [
    "DEFAULT_PROMPT", "METRICS_VERSION", "REPORT", "ReportDataset", "ReportEvalResult", "ReportModel", "ReportRecord",
    "caption_scores", "detokenize", "evaluate_reports", "facts_from_findings", "facts_from_text",
    "findings_scores", "java_status", "report_collate", "report_scores", "tokenize",
]
