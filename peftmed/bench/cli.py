"""``peftmed bench``: the command (registered through the ``register_commands`` hook)."""

from __future__ import annotations

import argparse

from ..cli import Command
from ..errors import ConfigError
from ..files import check_output_path
from ..hookspecs import hookimpl
from ..options import parse_key_values
from ..plugins import default_registry
from . import report
from .html import compare_html
from .results import dumps, read_results
from .runner import DEFAULT_DATASET, BenchConfig, run_bench
from .suites import BUILTIN_SUITES, SUITE_TASKS, read_suite_file

DESCRIPTION = """\
Run every method of a suite side by side on a Med-VQA backbone: trainable parameters, peak memory,
training throughput, time to the end of the same budget, and accuracy (ACC closed/open/overall),
with the huggingface/peft baseline beside where peft has the method.

With no arguments: the default suite on miss-tiny and the generated phantom dataset (nothing to
download; a few minutes on a 2-core CPU). Results (results.json, results.csv, plots, report.md) go to
--output (default bench-results/<timestamp>).

examples:
  peftmed bench
  peftmed bench --suite mile --steps 100
  peftmed bench --recipes '*=layernorm' 'F|LoRA|LoRA' --no-peft
  peftmed bench --dataset vqa-rad --data-dir ../shared/data/vqa_rad --suite layernorm
  peftmed bench --transfer domain=ct domain=mr
  peftmed bench --output bench-results/a --resume
  peftmed bench --compare bench-results/a bench-results/b
"""


# The default protocol (docs/bench.md says what each costs and what it buys): adaptation steps per recipe under
# the transfer protocol, the seeds (each its own source model), the target and source test records scored
TRANSFER_STEPS = 120
TRANSFER_SEEDS = (0, 1, 2)
TRANSFER_EVAL_SAMPLES = 600


def parse_options(items, what: str) -> dict:
    """``["k=v", "a=1,b=2"]`` -> ``{"k": "v", "a": 1, "b": 2}`` (``peftmed.options.parse_key_values``)."""
    return parse_key_values(items, what, split_commas=True)


def configure(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to run")
    what.add_argument("--backbone", "-b", default="miss-tiny", help="registered backbone (default miss-tiny)")
    what.add_argument("--dataset", "-d", help="registered dataset (default: the task's: phantom for Med-VQA, "
                                              "phantom-report for --suite irg)")
    what.add_argument("--task", help="a registered task (default: the suite's, else the dataset's)")
    what.add_argument("--data-dir", help="dataset folder, for datasets read from files (e.g. vqa-rad)")
    what.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    pick = what.add_mutually_exclusive_group()
    pick.add_argument("--recipes", nargs="+", metavar="RECIPE",
                      help="recipes to compare, e.g. '*=layernorm' 'F|LoRA|LoRA' 'fusion=lora(r=4)'")
    pick.add_argument("--suite", help="built-in suite: default, mile, layernorm, irg (report generation; see "
                                      "--list-suites)")
    pick.add_argument("--suite-file", help="a suite in YAML, TOML or JSON: {recipes: [recipe | {recipe, label}]}")
    what.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads per job (default 1: fixed, so the figures do not depend on the machine's "
                           "core count)")
    what.add_argument("--workers", type=int,
                      help="jobs run side by side (default: one per core, at most 2 on a CPU; 1 on a GPU)")
    what.add_argument("--list-suites", action="store_true", help="print the built-in suites and exit")
    what.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                      help="import MODULE as a peftmed plugin (e.g. your own backbone); repeatable")
    budget = p.add_argument_group("budget and training")
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe (default: the task's, "
                                                                f"{TRANSFER_STEPS} with the transfer protocol)")
    budget.add_argument("--time-budget", type=float, help="seconds of training per recipe (stops at steps or "
                                                         "time, whichever comes first)")
    budget.add_argument("--batch-size", type=int, help="training batch size (default 16 with the transfer "
                                                              "protocol, else 8)")
    budget.add_argument("--lr", type=float, help="one learning rate for every method (default: each method's usual "
                                                 "rate, e.g. LoRA 1e-3, full 1e-4)")
    budget.add_argument("--seed", type=int, help="one seed of weights, data order and dropout (default: the "
                                                 "protocol's seeds, 0 1 2 with the transfer protocol; else 0)")
    budget.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="repeat every recipe with these seeds (each its own source model under the transfer "
                             "protocol): the table shows the mean, the spread over seeds, on how many seeds a recipe "
                             "beats frozen, and intervals and tests over the test records")
    budget.add_argument("--eval-samples", type=int, help="score the first N test records (default: the task's)")
    budget.add_argument("--num-beams", type=int, default=1, help="beams of answer generation (default 1: greedy)")
    budget.add_argument("--backbone-option", action="append", metavar="K=V", help="builder option, repeatable")
    budget.add_argument("--dataset-option", action="append", metavar="K=V",
                        help="dataset option (both splits), e.g. n_images=100; repeatable")
    budget.add_argument("--transfer", nargs=2, metavar=("SOURCE", "TARGET"),
                        help="transfer protocol: train the backbone fully on SOURCE (dataset options, e.g. "
                             "domain=ct), then compare the methods adapting it to TARGET (e.g. domain=mr)")
    budget.add_argument("--train-test-overlap", choices=("drop", "keep"), default="drop",
                        help="training questions that repeat a test question (VQA-RAD's split has 3): drop "
                             "(default) or keep")
    budget.add_argument("--source-steps", type=int, default=400, help="steps of source training (default 400)")
    budget.add_argument("--source-eval-samples", type=int, default=300,
                        help="source-domain test records scored after adapting, for forgetting (default 300)")
    budget.add_argument("--source-lr", type=float, default=2e-3, help="learning rate of source training (default 2e-3)")
    budget.add_argument("--source-batch-size", type=int, default=32, help="batch size of source training (default 32)")
    budget.add_argument("--no-transfer", action="store_true",
                        help="adapt the randomly initialised backbone directly instead of the dataset's default "
                             "transfer protocol (phantom: train fully on domain=ct, adapt to domain=mr)")
    out = p.add_argument_group("output")
    out.add_argument("--no-peft", action="store_true", help="skip the huggingface/peft baseline rows")
    out.add_argument("--output", "-o", help="results folder (default bench-results/<timestamp>)")
    out.add_argument("--resume", action="store_true", help="continue the suite in --output, skipping done recipes")
    out.add_argument("--compare", nargs=2, metavar=("A", "B"),
                     help="print two results folders side by side and write compare.html (into --output, else here)")
    out.add_argument("--no-isolate", action="store_true",
                     help="run every recipe in this process (faster start; CPU memory figures then include "
                          "earlier recipes' heap)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--report-to", metavar="TARGETS",
                     help="tensorboard, wandb and/or mlflow (comma list): each recipe's training curves as its own run, "
                          "under OUTPUT/logs/")
    out.add_argument("--json", action="store_true", help="print the results document as JSON at the end")


def build_config(args, registry=None):
    """The BenchConfig a parsed ``peftmed bench`` command line asks for (defaults from the task and dataset)."""
    registry = registry or default_registry()
    recipes = list(args.recipes or [])
    if args.suite_file:
        recipes = list(read_suite_file(args.suite_file))

    task_name = args.task or SUITE_TASKS.get(args.suite or "")
    dataset = args.dataset or (registry.get("task", task_name).default_dataset if task_name else DEFAULT_DATASET)
    spec = registry.get("dataset", dataset)
    task = registry.get("task", task_name or spec.task)
    transfer = tuple(parse_options([t], "--transfer") for t in args.transfer) if args.transfer else None
    if transfer is None and not args.no_transfer and spec.transfer is not None and task.name == spec.task:
        transfer = tuple(dict(t) for t in spec.transfer)  # the dataset's default protocol (docs/bench.md)
    # the transfer protocol needs a real budget to say anything (docs/bench.md)
    default_steps, default_batch = (TRANSFER_STEPS, 16) if transfer else (task.bench_steps, task.bench_batch_size)
    if args.seeds:
        seeds = tuple(args.seeds)
    elif args.seed is not None:
        seeds = (args.seed,)
    else:
        seeds = TRANSFER_SEEDS if transfer else (0,)
    default_eval = TRANSFER_EVAL_SAMPLES if transfer else task.bench_eval_samples
    config = BenchConfig(
        backbone=args.backbone, dataset=dataset, task=task_name, data_dir=args.data_dir, device=args.device,
        threads=args.threads, workers=args.workers,
        suite=args.suite, recipes=recipes,
        steps=args.steps if args.steps is not None else (None if args.time_budget else default_steps),
        time_budget=args.time_budget, batch_size=args.batch_size or default_batch, lr=args.lr,
        seed=seeds[0], seeds=seeds if len(seeds) > 1 else None,
        eval_samples=args.eval_samples if args.eval_samples is not None else default_eval,
        num_beams=args.num_beams, peft=not args.no_peft, output=args.output,
        resume=args.resume, backbone_options=parse_options(args.backbone_option, "--backbone-option"),
        dataset_options=parse_options(args.dataset_option, "--dataset-option"),
        transfer=transfer, source_steps=args.source_steps, source_lr=args.source_lr,
        source_batch_size=args.source_batch_size, source_eval_samples=args.source_eval_samples,
        isolate=not args.no_isolate, plugins=tuple(args.plugin),
        train_test_overlap=args.train_test_overlap,
        progress=not args.no_progress,
        report_to=args.report_to,
    )
    return config


def run(args) -> int:
    if args.list_suites:
        for name, entries in BUILTIN_SUITES.items():
            print(f"{name}:")
            for e in entries:
                print(f"  {e.name:<22} {e.recipe}")
        return 0
    if args.compare:
        if args.output:
            check_output_path(args.output, flag="--output", kind="folder")
        a, b = (read_results(path) for path in args.compare)
        registry, cfg = default_registry(), a["meta"].get("config", {})
        task = registry.get("task", cfg.get("task") or registry.get("dataset", cfg.get("dataset")).task)
        print(report.compare_text(a, b, *args.compare, task))
        from pathlib import Path

        target = Path(args.output) / "compare.html" if args.output else Path("compare.html")
        target.parent.mkdir(parents=True, exist_ok=True)
        names = [Path(x).name or x for x in args.compare]
        if names[0] == names[1]:
            names = list(args.compare)
        print(f"wrote {compare_html(target, a, b, names[0], names[1], task)}")
        return 0
    if args.resume and not args.output:
        raise ConfigError("--resume continues a results folder: name it with --output FOLDER")
    if args.output:
        check_output_path(args.output, flag="--output", kind="folder")
    data = run_bench(build_config(args))
    if args.json:
        print(dumps(data))
    failed = [r for r in data["rows"] if r["provider"] == "peftmed" and r["status"] != "ok"]
    return 1 if failed and len(failed) == len([r for r in data["rows"] if r["provider"] == "peftmed"]) else 0


@hookimpl
def register_commands(register):
    register(Command("bench", "compare fine-tuning methods on a Med-VQA backbone (params, memory, speed, "
                              "accuracy; vs huggingface/peft)", configure, run, description=DESCRIPTION))
