"""``peftmed train --task report`` and ``peftmed eval --task report``: the report flows of the train
and eval commands (``peftmed.train.commands`` hands a run over here when its task is ``report``).

The run folder is the same as for VQA (adapter/, checkpoints/, train_config.json, tokenizer/,
metrics.json, predictions.json); the model is the backbone wrapped in ``ReportModel``, the data are
``ReportRecord``s, and the scores are ``report_scores`` beside the most-frequent-report baseline.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("peftmed.report")

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


def run_train_report(opts: dict[str, Any], registry, backbone, spec, recipe, config) -> int:
    from ..model import apply
    from ..train import distributed
    from ..train.checkpoint import latest_checkpoint, write_json_atomic
    from ..train.commands import RUN_CONFIG, TOKENIZER_DIR, _load, build_model, save_tokenizer
    from ..train.trainer import Trainer
    from .evaluate import baseline_scores, evaluate_reports, summary_text
    from .model import ReportModel
    from .records import ReportDataset, report_collate

    out = Path(opts["output"] or f"runs/{backbone.name}-{spec.name}")
    opts["output"] = str(out)
    if not opts["resume"] and latest_checkpoint(out / "checkpoints") is not None:
        raise ConfigError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue it or choose "
                          f"another --output")
    main = int(os.environ.get("RANK", "0")) == 0
    train = _load(spec.name, opts["train_split"], opts, registry)
    test = _load(spec.name, opts["eval_split"], opts, registry)
    tokenizer_dir = out / TOKENIZER_DIR
    model = build_model(backbone, opts, texts=training_texts(train),
                        tokenizer_dir=tokenizer_dir if opts["resume"] and tokenizer_dir.is_dir() else None)
    pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
    rm = ReportModel(pm)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_CONFIG, opts)
        if not tokenizer_dir.is_dir():
            save_tokenizer(model, tokenizer_dir)
        print(pm.trainable_report(), file=sys.stderr)
        print(f"train: {len(train)} reports ({opts['train_split']}), eval: {len(test)} ({opts['eval_split']})",
              file=sys.stderr)
    image_size = int(rm.image_size)
    test_set = ReportDataset(test, image_size)
    eval_batch = config.eval_batch_size or config.batch_size
    tokens = report_tokens(config.max_new_tokens)

    def eval_fn(m, limit):
        return evaluate_reports(m, test, batch_size=eval_batch, num_beams=config.num_beams, max_new_tokens=tokens,
                                limit=limit, dataset=test_set).scores

    trainer = Trainer(rm, ReportDataset(train, image_size), config, output_dir=out, collate_fn=report_collate,
                      eval_fn=eval_fn, run_info={"backbone": backbone.name, "recipe_json": recipe.to_dict(),
                                                 "dataset": spec.name, "data_options": opts["data_options"],
                                                 "task": "report"})
    result = trainer.train(resume=opts["resume"])
    if not main or distributed.is_fsdp(trainer.wrapped):
        return 0
    summary: dict[str, Any] = {"task": "report", "backbone": backbone.name, "recipe": recipe.to_text(),
                               "dataset": spec.name, "eval_split": opts["eval_split"], "train": result.to_dict(),
                               "trainable": pm.trainable_report().to_dict()}
    if opts["evaluate"]:
        final = evaluate_reports(rm, test, batch_size=eval_batch, num_beams=config.num_beams, max_new_tokens=tokens,
                                 progress=config.progress, dataset=test_set)
        baseline = baseline_scores(train, test)
        summary.update(scores=final.scores, most_frequent_report_baseline=baseline)
        final.write(out)
        write_json_atomic(out / "metrics.json", summary)
        print(f"{spec.name}/{opts['eval_split']} after {result.step} steps: {final.summary()}")
        print(f"most-frequent-report baseline: {summary_text(baseline)}")
    else:
        write_json_atomic(out / "metrics.json", summary)
    print(f"adapter: {out / 'adapter'}   metrics: {out / 'metrics.json'}")
    return 0


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
