"""``peftmed train`` and ``peftmed eval``: the trainer and evaluation from the command line.

    peftmed train --backbone miss-tiny --recipe '*=lora(r=8,alpha=16)' --dataset phantom --steps 300
    peftmed train --config experiments/lora.yaml --lr 5e-4          # flags override the file
    peftmed train --output runs/lora --resume                       # continue the latest checkpoint
    torchrun --nproc-per-node 2 -m peftmed train --config ...       # DDP (gloo on CPU, nccl on GPU)
    peftmed eval --adapter runs/lora/adapter --dataset phantom --split test

Every option is a key of the experiment file (YAML, TOML or JSON; dashes or underscores) and a flag.
The output folder holds ``adapter/`` (the trained adapter), ``checkpoints/``, ``train_config.json``
(every resolved option: reusable as ``--config``), ``metrics.json``, ``predictions.json`` and the
model's tokenizer when it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from ..cli import Command, positive_int, str2bool
from ..data import load_records
from ..data.images import verify_images
from ..data.instruction import render, render_questions
from ..data.records import drop_test_questions
from ..errors import ConfigError, PeftmedError, UnknownNameError
from ..files import check_output_path, write_json_atomic
from ..hookspecs import hookimpl
from ..memory import prepare_from_config
from ..memory.checkpointing import parse_components
from ..memory.quantize import bitsandbytes_module, default_components
from ..model import apply, read_manifest
from ..options import parse_bool, parse_key_value
from ..plugins import default_registry
from ..recipe import Recipe
from ..run.config import (DICT_OPTIONS, RUN_OPTIONS, TrainConfig, coerce, default_options, field_names, field_type,
                          read_config_file)
from ..run.folder import (RUN_CONFIG, RUN_FILES, TOKENIZER_DIR, TOKENIZER_FILES, RunLock, check_output,
                          check_same_base, read_run_config)
from ..run.model import build_model, load_adapted, run_options, save_tokenizer
from ..runtime import resolve_device
from ..tasks import answer_lengths, baseline_scores, build_options, check_backbone, evaluate, resolve_task
from ..tokenizer_files import IDENTITY_FILE
from . import checkpoint, distributed
from .trainer import Trainer, TrainingInterrupted

log = logging.getLogger("peftmed.train")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _key_value(text: str) -> tuple[str, Any]:
    try:
        return parse_key_value(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_option(group, name: str, kind, help: str, choices=None) -> None:
    # default SUPPRESS: only flags actually given reach the namespace, so they override the file
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help}
    if kind is bool:
        kw.update(nargs="?", const=True, type=str2bool, metavar="BOOL")
        kw["help"] += " (--%s alone means true; --%s false)" % (name.replace("_", "-"), name.replace("_", "-"))
    elif kind is dict:
        kw.update(action="append", type=_key_value, metavar="KEY=VALUE")
    else:
        kw.update(type=kind, metavar=name.upper())
        if choices:
            kw["choices"] = choices
    group.add_argument(_flag(name), **kw)


# ---- peftmed train -----------------------------------------------------------------------------------
def configure_train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fine-tune a backbone with a recipe on a dataset, evaluate, and write the adapter, checkpoints,\n"
        "metrics and predictions to --output. Every option is also a key of a --config file (YAML, TOML\n"
        "or JSON); flags override the file.\n\n"
        "example:\n"
        "  peftmed train --backbone miss-tiny --recipe '*=lora(r=8,alpha=16)' --dataset phantom \\\n"
        "      --steps 300 --batch-size 16 --lr 1e-3 --output runs/phantom-lora")
    p.add_argument("--config", help="experiment file (.yaml, .toml, .json) whose keys are these options")
    run = p.add_argument_group("run")
    for name, (kind, default, help) in RUN_OPTIONS.items():
        _add_option(run, name, kind, help + (f" [default: {default}]" if default not in (None, {}) else ""))
    train = p.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        help = f.metadata.get("help", "")
        if f.default is not None:
            help += f" [default: {f.default}]"
        _add_option(train, f.name, field_type(TrainConfig, f.name), help, f.metadata.get("choices"))


def resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """Defaults <- the --config file <- flags given; dict options merge key by key. Returns the options and
    the keys the user gave (in the file or as flags)."""
    known = list(RUN_OPTIONS) + field_names(TrainConfig)
    opts = default_options()
    given: set[str] = set()
    if getattr(args, "config", None):
        from_file = read_config_file(args.config, known, mappings=DICT_OPTIONS)
        for key, value in from_file.items():
            given.add(key)
            if key in DICT_OPTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} in {args.config} must be a mapping of option: value, got {value!r}")
                opts[key].update({str(k).replace("-", "_"): v for k, v in value.items()})
            elif key in RUN_OPTIONS:
                kind = RUN_OPTIONS[key][0]
                if kind is bool:
                    try:
                        value = parse_bool(value)
                    except ConfigError:
                        raise ConfigError(f"{key} in {args.config} expects true or false, got {value!r}") from None
                elif value is not None and not isinstance(value, str):
                    raise ConfigError(f"{key} in {args.config} expects a string, got {value!r}")
                opts[key] = value
            else:
                opts[key] = coerce(TrainConfig, key, value)
    for key in known:
        if hasattr(args, key):
            given.add(key)
            value = getattr(args, key)
            if key in DICT_OPTIONS:
                opts[key].update(dict(value))
            else:
                opts[key] = value
    return opts, given


def _check_before_training(opts: dict[str, Any], registry) -> tuple[Any, Any, Any, TrainConfig, Any]:
    """Every name and option is checked here, before data is read or a model is built."""
    missing = [k for k in ("backbone", "recipe", "dataset") if not opts.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(_flag(k) for k in missing)} (a flag or a key of --config)")
    backbone = registry.backbone(opts["backbone"])
    spec = registry.get("dataset", opts["dataset"])
    for split in (opts["train_split"], opts["eval_split"]):
        spec.check_split(split)
    unknown = sorted(set(opts["data_options"]) - set(spec.options or {}))
    if unknown:  # (load_records checks too; here it is named before anything else is done)
        raise UnknownNameError(f"option of dataset {spec.name!r}", unknown[0], spec.options or {})
    if getattr(spec, "needs_data_dir", False) and not opts.get("data_dir"):
        raise ConfigError(f"dataset {spec.name!r} reads files: pass --data-dir pointing at its folder")
    task = resolve_task(registry, opts.get("task"), spec)
    check_backbone(task, backbone)
    opts["task"] = task.name
    opts["backbone_options"] = build_options(task, backbone, opts.get("backbone_options"))
    recipe = Recipe.parse(opts["recipe"], components=list(backbone.components)).canonical(registry)
    for component, calls in recipe.trained(backbone.components, registry).items():
        for call in calls:
            registry.method(call.name).make_config(call.options)
    if not recipe.trained(backbone.components, registry):
        raise ConfigError(f"recipe {opts['recipe']!r} trains nothing (every component is frozen)")
    config = TrainConfig.from_dict({k: opts[k] for k in field_names(TrainConfig)})
    check_memory_options(config, backbone)
    return backbone, spec, recipe, config, task


def check_memory_options(config: TrainConfig, backbone) -> None:
    """--grad-checkpoint and --quantize name components this backbone has (and bitsandbytes is there)."""
    parse_components(config.grad_checkpoint, list(backbone.components))
    if config.quantize != "none":
        if config.quantize_components:
            parse_components(config.quantize_components, list(backbone.components), "--quantize-components")
        else:
            default_components(backbone)
        bitsandbytes_module()


def clear_run_outputs(out: Path) -> list[str]:
    """Remove what an earlier peftmed run wrote into ``out`` (and only that); returns what was removed."""
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        for step in ckpts.glob("step-*"):
            if checkpoint.is_checkpoint(step):
                shutil.rmtree(step)
                removed.append(f"checkpoints/{step.name}")
        if (ckpts / checkpoint.LATEST).is_file():
            (ckpts / checkpoint.LATEST).unlink()
        checkpoint.remove_stale_temporaries(ckpts)
    adapter = out / "adapter"
    for name in ("adapter.json", "adapter.safetensors"):
        if (adapter / name).is_file():
            (adapter / name).unlink()
            removed.append(f"adapter/{name}")
    tok = out / TOKENIZER_DIR
    if (tok / IDENTITY_FILE).is_file() or (tok / "class.txt").is_file():  # a tokenizer peftmed saved
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                (tok / name).unlink()
                removed.append(f"{TOKENIZER_DIR}/{name}")
    return removed


def _load(spec_name: str, split: str, opts: dict[str, Any], registry):
    return load_records(spec_name, split, data_dir=opts.get("data_dir"), registry=registry,
                        **(opts.get("data_options") or {}))


def run_train(args: argparse.Namespace) -> int:
    # the step lines of --log-every are what a run without a progress bar shows: print them without -v
    logger = logging.getLogger("peftmed.train")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    registry = default_registry()
    opts, given = resolve_options(args)
    if opts["resume"] and opts.get("output") and (Path(opts["output"]) / RUN_CONFIG).is_file():
        saved = read_run_config(opts["output"])
        notes = check_same_base(saved, opts, given, repr(opts["output"]))
        if notes:
            log.info("resuming: %s", ", ".join(notes))
    backbone, spec, recipe, config, task = _check_before_training(opts, registry)
    return train_task(task, opts, registry, backbone, spec, recipe, config)


def _decide_on_rank0(d, decide) -> None:
    """Run ``decide()`` (checks of the output folder) on rank 0 only, and make every rank raise the error it
    raised: the other ranks follow rank 0's verdict instead of checking a folder rank 0 is writing."""
    error = None
    if d.is_main:
        try:
            decide()
        except PeftmedError as exc:
            error = str(exc)
    if d.enabled:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)


def train_task(task, opts: dict[str, Any], registry, backbone, spec, recipe, config) -> int:
    """Train ``recipe`` on ``backbone`` for ``task`` (a registered Task) and evaluate; what ``peftmed train`` runs."""
    out = Path(opts["output"] or f"runs/{backbone.name}-{spec.name}")
    opts["output"] = str(out)
    d = distributed.setup(config.device)  # under torchrun: the group every rank follows rank 0's decisions in
    lock = RunLock(out)
    ok = False
    try:
        def decide():
            check_output(out, resume=opts["resume"], overwrite=opts.get("overwrite", False))
            if opts["resume"]:
                _check_resumable(out, backbone)
            lock.acquire()

        _decide_on_rank0(d, decide)
        ok = _train_in(out, d, task, opts, registry, backbone, spec, recipe, config) == 0
    finally:
        lock.release()
        d.close(clean=ok)
    return 0


def _train_in(out: Path, d, task, opts, registry, backbone, spec, recipe, config) -> int:
    main = d.is_main
    train = _load(spec.name, opts["train_split"], opts, registry)
    test = _load(spec.name, opts["eval_split"], opts, registry)
    verify_images(train + test, where=f"{spec.name} ({opts['train_split']} and {opts['eval_split']})")
    train, test = prepare_records(train, test, opts, spec.name)
    data = spec.describe(opts.get("data_dir"), **(opts.get("data_options") or {}))
    tokenizer_dir = out / TOKENIZER_DIR
    model = build_model(backbone, opts, texts=task.texts(train),
                        tokenizer_dir=tokenizer_dir if opts["resume"] else None)
    pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
    memory = prepare_memory(pm, config)
    task_model = task.wrap(pm)
    lengths = None
    if task.targets is not None:  # generation and training answer lengths from the data, unless set
        lengths = answer_lengths(task_model, task.targets(train), task.targets(test),
                                 max_new_tokens=config.max_new_tokens,
                                 fix_training_cap="max_answer_tokens" not in (opts.get("backbone_options") or {}))
    tokens = lengths.max_new_tokens if lengths is not None else (config.max_new_tokens or task.max_new_tokens)
    opts["max_new_tokens"] = tokens  # eval and predict answer with the run's length
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if opts.get("overwrite") and not opts["resume"]:
            removed = clear_run_outputs(out)
            if removed:
                log.warning("--overwrite: replaced the earlier run's %s in %s", ", ".join(removed[:8])
                            + (" ..." if len(removed) > 8 else ""), out)
        write_json_atomic(out / RUN_CONFIG, opts)
        if not opts["resume"]:
            save_tokenizer(model, tokenizer_dir, backbone)
        print(pm.trainable_report(lr=config.lr, weight_decay=config.weight_decay, method_lr=config.method_lr),
              file=sys.stderr)
        if memory:
            print(f"memory: {describe_memory(memory)}", file=sys.stderr)
        print(f"data: {data}", file=sys.stderr)
        if lengths is not None:
            print(lengths.summary(), file=sys.stderr)
            if lengths.reachable < lengths.total:
                log.warning("%d of %d %s answers are longer than %d tokens and cannot be generated; pass a larger "
                            "--max-new-tokens to reach them", lengths.total - lengths.reachable, lengths.total,
                            opts["eval_split"], lengths.max_new_tokens)
        print(f"train: {len(train)} {task.noun} ({opts['train_split']}), eval: {len(test)} ({opts['eval_split']})",
              file=sys.stderr)
    d.barrier()  # the run folder is written before any rank goes on

    image_size = int(getattr(task_model, "image_size"))
    test_set = task.dataset(test, image_size)
    eval_batch = config.eval_batch_size or config.batch_size

    def evaluate_now(m, limit=None, progress=False):
        return evaluate(task, m, test, registry=registry, batch_size=eval_batch, num_beams=config.num_beams,
                        max_new_tokens=tokens, limit=limit, dataset=test_set, progress=progress)

    run_info = {"backbone": backbone.name, "recipe_json": recipe.to_dict(), "dataset": spec.name,
                "data_options": opts["data_options"], "task": task.name}
    trainer = Trainer(task_model, task.dataset(train, image_size), config, output_dir=out,
                      eval_fn=lambda m, limit: evaluate_now(m, limit).scores, run_info=run_info,
                      collate_fn=task.collate)
    trainer.keep_loggers_open = True  # the final evaluation goes to --report-to too
    try:
        result = trainer.train(resume=opts["resume"])
    except TrainingInterrupted as exc:
        if exc.checkpoint is not None:
            exc.args = (f"{exc.args[0]}\n  resume: {resume_command()}",)
        raise
    if not main:
        return 0
    summary: dict[str, Any] = {"task": task.name, "backbone": backbone.name, "recipe": recipe.to_text(),
                               "dataset": spec.name, "data": data, "eval_split": opts["eval_split"],
                               "n_train": len(train), "n_eval": len(test), "train": result.to_dict(),
                               "memory": memory, "answers": lengths.to_dict() if lengths is not None else None}
    scores = None
    if distributed.is_fsdp(trainer.wrapped):
        # a sharded model answers on no single rank: evaluate the adapter
        write_json_atomic(out / "metrics.json", summary)
        trainer.close_loggers()
        print(f"adapter: {out / 'adapter'}   (a sharded run; evaluate it with: peftmed eval --adapter "
              f"{out / 'adapter'})")
        return 0
    summary["trainable"] = pm.trainable_report().to_dict()
    if opts["evaluate"]:
        final = evaluate_now(task_model, progress=config.progress)
        baseline = baseline_scores(task, train, test, registry)
        summary.update({"scores": final.scores, task.baseline_name: baseline})
        final.write(out)
        scores = final.scores
    # metrics.json first: a logger that fails while closing (a full disk, a server gone) loses nothing
    write_json_atomic(out / "metrics.json", summary)
    trainer.close_loggers(scores)
    if scores is not None:
        print(f"{spec.name}/{opts['eval_split']} after {result.step} steps: {final.summary()}")
        print(f"{task.baseline_label} {task.summary(baseline)}")
    print(f"adapter: {out / 'adapter'}   metrics: {out / 'metrics.json'}")
    return 0


def prepare_memory(pm, config) -> dict:
    """The run's memory options applied to the adapted model (quantize, base dtype, checkpointing)."""
    device = resolve_device(config.device) if config.quantize != "none" else None
    return prepare_from_config(pm, config, device=device)


def describe_memory(memory: dict) -> str:
    parts = []
    if "quantized" in memory:
        q = memory["quantized"]
        parts.append(f"NF4 base: {q['layers']} linear layers, {q['weights']:,} weights in 4 bits")
    if "base_dtype" in memory:
        c = memory["base_dtype"]
        parts.append(f"frozen weights {c['frozen']:,} in the base dtype, trainable {c['trainable fp32']:,} fp32, "
                     f"norms {c['frozen norms fp32']:,} fp32")
    if "grad_checkpoint" in memory:
        parts.append("checkpointed layers: " + ", ".join(f"{k} {v}" for k, v in memory["grad_checkpoint"].items()))
    return "; ".join(parts)


def prepare_records(train: list, test: list, opts: dict[str, Any], dataset: str) -> tuple[list, list]:
    """The records a run trains and evaluates on: training records that repeat a test question dropped
    (unless --train-test-overlap keep), and with --instruction-format both rendered in the MILE paper's
    instruction format (the training data through the leak guard)."""
    overlap = opts.get("train_test_overlap") or "drop"
    if overlap not in ("drop", "keep"):
        raise ConfigError(f"--train-test-overlap must be drop or keep, got {overlap!r}")
    if overlap == "drop":
        train = drop_test_questions(train, test, where=f"{dataset} training data")
    if opts.get("instruction_format"):
        if not all(hasattr(r, "question") for r in train[:1]):
            raise ConfigError(f"--instruction-format renders questions, and {dataset!r} records have none")
        seed = int(opts.get("seed") or 0)
        rendered = render(train, seed=seed, test_records=test)  # refuses test questions in the training data
        test = render_questions(test, train, seed=seed + 1)
        train = rendered
    return train, test


def _check_resumable(out: Path, backbone) -> None:
    """Before anything is built: the run in ``out`` exists and used this backbone."""
    try:
        found = checkpoint.find_checkpoint(out)
    except ConfigError:
        raise
    except PeftmedError as exc:
        raise ConfigError(f"{exc} (or --overwrite to start a new run in this folder)") from None
    before = checkpoint.read_meta(found).get("backbone")
    if before is not None and before != backbone.name:
        raise ConfigError(f"cannot resume {str(out)!r}: its run trained backbone {before!r}, this command asks for "
                          f"{backbone.name!r}; resume with --backbone {before} or train into another --output")


def resume_command() -> str:
    """The command line that continues this run (the one typed, plus --resume)."""
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    prog = "peftmed" if not sys.argv[0].endswith("__main__.py") else "python -m peftmed"
    return " ".join(shlex.quote(a) for a in [prog, *argv, "--resume"])


# ---- peftmed eval ------------------------------------------------------------------------------------
def configure_eval(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluate a trained adapter: rebuild its base model (as the training run did: same backbone,\n"
        "options, seed and tokenizer, read from the run's train_config.json), load the adapter, answer\n"
        "every record of --split and print the task's scores (Med-VQA: ACC closed/open/overall) beside\n"
        "the task's baseline (Med-VQA: the majority answer).")
    p.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/ or a checkpoint's adapter/)")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    p.add_argument("--split", default="test", help="split to evaluate [default: test]")
    p.add_argument("--data-dir", help="the dataset's folder (default: the run's)")
    p.add_argument("--data-options", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a dataset option (repeatable); default: the run's")
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions per batch [default: 16]")
    p.add_argument("--num-beams", type=positive_int, default=3, help="beams of answer generation [default: 3]")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="longest generated text in tokens [default: the run's (derived from its training answers)]")
    p.add_argument("--task", help="a registered task (default: the run's, else the dataset's)")
    p.add_argument("--output", help="folder for predictions.json and metrics.json (default: print only)")
    p.add_argument("--device", default="auto", help="cpu, cuda... [default: auto]")
    p.add_argument("--progress", nargs="?", const=True, type=str2bool, default=True, metavar="BOOL",
                   help="show a progress bar [default: true]")
    p.add_argument("--base-dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the frozen base [default: the training run's]")
    p.add_argument("--quantize", choices=["none", "nf4"],
                   help="hold the base's linear weights in 4 bits [default: the training run's; 'none' evaluates "
                        "an adapter trained on a 4-bit base on a full-precision one]")


def run_eval(args: argparse.Namespace) -> int:
    registry = default_registry()
    if args.output:
        check_output_path(args.output, flag="--output", kind="folder")
    adapter = Path(args.adapter)
    manifest = read_manifest(adapter)
    run_dir, opts = run_options(adapter)
    if run_dir is None:
        log.warning("no %s above %s: the base model is rebuilt with default options and seed 0, so frozen "
                    "weights differ from training unless the recipe trains every tensor", RUN_CONFIG, adapter)
    dataset = args.dataset or opts.get("dataset")
    if not dataset:
        raise ConfigError("pass --dataset (this adapter has no training run folder to take it from)")
    same_data = dataset == opts.get("dataset")
    opts["data_dir"] = args.data_dir or (opts.get("data_dir") if same_data else None)
    data_options = dict(opts.get("data_options") or {}) if same_data else {}
    data_options.update(dict(args.data_options or []))
    opts["data_options"] = data_options
    spec = registry.get("dataset", dataset)
    spec.check_split(args.split)
    task = resolve_task(registry, args.task or (opts.get("task") if same_data else None), spec)
    test = _load(spec.name, args.split, opts, registry)
    verify_images(test, where=f"{spec.name} ({args.split})")
    train_split = opts.get("train_split") or spec.splits[0]
    # the baseline needs the training records: only known when evaluating on the run's dataset
    train = _load(spec.name, train_split, opts, registry) if same_data else None
    if train is not None:
        train, test = prepare_records(train, test, opts, spec.name)
    elif opts.get("instruction_format"):
        raise ConfigError("this adapter was trained on instruction-format questions: evaluate it on its run's "
                          "dataset (the options are drawn from its training answers)")
    _, task_model, _, _ = load_adapted(adapter, registry=registry, device=args.device, base_dtype=args.base_dtype,
                                       quantize=args.quantize, task=task.name,
                                       texts=task.texts(train) if train is not None else None)
    tokens = args.max_new_tokens or opts.get("max_new_tokens") or task.max_new_tokens
    lengths = None
    if task.targets is not None and train is not None:
        lengths = answer_lengths(task_model, task.targets(train), task.targets(test), max_new_tokens=tokens,
                                 fix_training_cap=False)
    if lengths is not None:
        print(lengths.summary(), file=sys.stderr)
        if lengths.reachable < lengths.total:
            log.warning("%d of %d %s answers are longer than %d tokens and cannot be generated; pass a larger "
                        "--max-new-tokens to reach them", lengths.total - lengths.reachable, lengths.total, args.split,
                        tokens)
    result = evaluate(task, task_model, test, registry=registry, batch_size=args.batch_size,
                      num_beams=args.num_beams, max_new_tokens=tokens, progress=args.progress)
    print(f"{spec.name}/{args.split} with {manifest['recipe']}: {result.summary()}")
    summary: dict[str, Any] = {"task": task.name, "adapter": str(adapter), "dataset": spec.name, "split": args.split,
                               "data": spec.describe(opts.get("data_dir"), **data_options), "n_eval": len(test),
                               "recipe": manifest["recipe"], "scores": result.scores, "max_new_tokens": tokens,
                               "answers": lengths.to_dict() if lengths is not None else None}
    if train is not None:
        summary[task.baseline_name] = baseline_scores(task, train, test, registry)
        print(f"{task.baseline_label} {task.summary(summary[task.baseline_name])}")
    if args.output:
        out = Path(args.output)
        result.write(out)
        write_json_atomic(out / "metrics.json", summary)
        print(f"predictions: {out / 'predictions.json'}   metrics: {out / 'metrics.json'}")
    return 0


@hookimpl
def register_commands(register):
    register(Command("train", "fine-tune a backbone with a recipe on a dataset (resumable; DDP under torchrun)",
                     configure_train, run_train))
    register(Command("eval", "evaluate a trained adapter on a dataset (its task's scores, e.g. ACC closed/open/overall)",
                     configure_eval, run_eval))
