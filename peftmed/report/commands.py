"""``peftmed train --task report`` and ``peftmed eval --task report``: the report task's parts
(``report_flow()``) of the one train/eval flow in ``peftmed.train.commands``.

The run folder is the same as for VQA (adapter/, checkpoints/, train_config.json, tokenizer/,
metrics.json, predictions.json); the model is the backbone wrapped in ``ReportModel``, the data are
``ReportRecord``s, and the scores are ``report_scores`` beside the most-frequent-report baseline.
"""

from __future__ import annotations


from ..errors import ConfigError

TASKS = ("vqa", "report")
VQA_MAX_NEW_TOKENS = 10  # TrainConfig's default answer length: a report run then generates DEFAULT_MAX_REPORT_TOKENS


def resolve_task(task: str | None, spec) -> str:
    """The run's task: as given, else the dataset's; a dataset of another task is refused."""
    dataset_task = getattr(spec, "task", "vqa")
    task = task or dataset_task
    if task not in TASKS:
        from ..errors import UnknownNameError

        raise UnknownNameError("task", task, TASKS)
    if task != dataset_task:
        raise ConfigError(f"--task {task} needs a {task} dataset, but {spec.name!r} is a {dataset_task} dataset "
                          f"(report datasets: iu-xray, mimic-cxr, phantom-report)")
    return task


def report_tokens(max_new_tokens: int) -> int:
    from .model import DEFAULT_MAX_REPORT_TOKENS

    return DEFAULT_MAX_REPORT_TOKENS if max_new_tokens == VQA_MAX_NEW_TOKENS else max_new_tokens


def training_texts(records) -> list[str]:
    """What a backbone trains its tokenizer on: the prompt and the reports."""
    from .model import DEFAULT_PROMPT

    return [DEFAULT_PROMPT] + [r.report for r in records]


def report_flow():
    """The report task's parts of ``peftmed train`` (peftmed.train.commands.train_with_flow runs it)."""
    from ..train.commands import TaskFlow
    from .evaluate import baseline_scores, evaluate_reports, summary_text
    from .model import ReportModel
    from .records import ReportDataset, report_collate

    return TaskFlow(name="report", noun="reports", texts=training_texts, wrap=ReportModel, dataset=ReportDataset,
                    evaluate=evaluate_reports, baseline=baseline_scores,
                    baseline_name="most_frequent_report_baseline", baseline_label="most-frequent-report baseline:",
                    summary=summary_text,
                    max_new_tokens=report_tokens, collate_fn=report_collate)
