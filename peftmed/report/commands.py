"""``peftmed train --task report`` and ``peftmed eval --task report``: the report flows of the train
and eval commands (``peftmed.train.commands`` hands a run over here when its task is ``report``).

The run folder is the same as for VQA (adapter/, checkpoints/, train_config.json, tokenizer/,
metrics.json, predictions.json); the model is the backbone wrapped in ``ReportModel``, the data are
``ReportRecord``s, and the scores are ``report_scores`` beside the most-frequent-report baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def run_eval_report(args, registry, *, adapter: Path, manifest: dict, run_dir: Path | None, opts: dict[str, Any],
                    backbone, spec) -> int:
    from ..model import load_adapter
    from ..train.checkpoint import write_json_atomic
    from ..train.commands import TOKENIZER_DIR, _load, build_model
    from ..train.distributed import resolve_device
    from .evaluate import baseline_scores, evaluate_reports, summary_text
    from .model import ReportModel

    test = _load(spec.name, args.split, opts, registry)
    same_data = spec.name == opts.get("dataset_of_run")
    train = _load(spec.name, opts.get("train_split") or spec.splits[0], opts, registry) if same_data else None
    tokenizer_dir = run_dir / TOKENIZER_DIR if run_dir else None
    model = build_model(backbone, opts, texts=training_texts(train) if train is not None else None,
                        tokenizer_dir=tokenizer_dir)
    rm = ReportModel(load_adapter(model, adapter, backbone=backbone, registry=registry))
    rm.to(resolve_device(args.device))
    tokens = report_tokens(args.max_new_tokens)
    result = evaluate_reports(rm, test, batch_size=args.batch_size, num_beams=args.num_beams, max_new_tokens=tokens,
                              progress=args.progress)
    print(f"{spec.name}/{args.split} with {manifest['recipe']}: {result.summary()}")
    summary: dict[str, Any] = {"task": "report", "adapter": str(adapter), "dataset": spec.name, "split": args.split,
                               "recipe": manifest["recipe"], "scores": result.scores}
    if train is not None:
        summary["most_frequent_report_baseline"] = baseline_scores(train, test)
        print(f"most-frequent-report baseline: {summary_text(summary['most_frequent_report_baseline'])}")
    if args.output:
        out = Path(args.output)
        result.write(out)
        write_json_atomic(out / "metrics.json", summary)
        print(f"predictions: {out / 'predictions.json'}   metrics: {out / 'metrics.json'}")
    return 0
