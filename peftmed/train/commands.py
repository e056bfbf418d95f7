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
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..cli import Command, str2bool
from ..data.images import verify_images
from ..errors import ConfigError, PeftmedError
from ..hookspecs import hookimpl
from .config import TrainConfig, coerce, field_names, field_type, read_config_file

log = logging.getLogger("peftmed.train")

RUN_CONFIG = "train_config.json"
TOKENIZER_DIR = "tokenizer"

# Options of a run beyond TrainConfig: (flag type, default, help). Dict-valued ones take KEY=VALUE.
RUN_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "backbone": (str, None, "a registered backbone (see 'peftmed backbones'), e.g. miss-tiny"),
    "recipe": (str, None, "which method each component gets, e.g. '*=lora(r=8)' or 'T|LoRA|LoRA'"),
    "dataset": (str, None, "a registered dataset, e.g. phantom, vqa-rad, slake"),
    "data_dir": (str, None, "the dataset's folder (vqa-rad, slake)"),
    "data_options": (dict, {}, "a dataset option KEY=VALUE (repeatable), e.g. --data-options domain=mr"),
    "backbone_options": (dict, {}, "a backbone build option KEY=VALUE (repeatable), e.g. size=tiny"),
    "pretrained": (str, None, "load the backbone from this checkpoint folder instead of a random init"),
    "train_split": (str, "train", "split to train on"),
    "eval_split": (str, "test", "split to evaluate on (during and after training)"),
    "output": (str, None, "output folder (default runs/<backbone>-<dataset>)"),
    "resume": (bool, False, "continue from the latest checkpoint in --output"),
    "overwrite": (bool, False, "train a new run into a non-empty --output: peftmed's files of the earlier run "
                               "(adapter, checkpoints, tokenizer, metrics) are replaced, nothing else is touched"),
    "evaluate": (bool, True, "evaluate on --eval-split after training"),
    "task": (str, None, "a registered task (vqa, report...: 'peftmed tasks'); default: the dataset's"),
    "train_test_overlap": (str, "drop", "training records that repeat a test question (same image and question; "
                                        "VQA-RAD's common split has 3): drop or keep"),
    "instruction_format": (bool, False, "train and evaluate on the MILE paper's instruction-format questions "
                                        "(templates with answer options; refused if a test question is in the "
                                        "training data)"),
}
DICT_OPTIONS = tuple(k for k, (t, _, _) in RUN_OPTIONS.items() if t is dict)


def _registry():
    from ..plugins import default_registry

    return default_registry()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _key_value(text: str) -> tuple[str, Any]:
    from ..options import parse_key_value

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


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults <- the --config file <- flags given; dict options merge key by key."""
    known = list(RUN_OPTIONS) + field_names(TrainConfig)
    opts: dict[str, Any] = {k: (dict(d) if isinstance(d, dict) else d) for k, (_, d, _) in RUN_OPTIONS.items()}
    opts.update({f.name: f.default for f in dataclasses.fields(TrainConfig)})
    if getattr(args, "config", None):
        from_file = read_config_file(args.config, known, mappings=DICT_OPTIONS)
        for key, value in from_file.items():
            if key in DICT_OPTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} in {args.config} must be a mapping of option: value, got {value!r}")
                opts[key].update({k.replace("-", "_"): v for k, v in value.items()})
            elif key in RUN_OPTIONS:
                opts[key] = str2bool(value) if RUN_OPTIONS[key][0] is bool and not isinstance(value, bool) else value
            else:
                opts[key] = coerce(TrainConfig, key, value)
    for key in known:
        if hasattr(args, key):
            value = getattr(args, key)
            if key in DICT_OPTIONS:
                opts[key].update(dict(value))
            else:
                opts[key] = value
    return opts


def _check_before_training(opts: dict[str, Any], registry) -> tuple[Any, Any, Any, TrainConfig, Any]:
    """Every name and option is checked here, before data is read or a model is built."""
    from ..recipe import Recipe
    from ..tasks import build_options, check_backbone, resolve_task

    missing = [k for k in ("backbone", "recipe", "dataset") if not opts.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(_flag(k) for k in missing)} (a flag or a key of --config)")
    backbone = registry.backbone(opts["backbone"])
    spec = registry.get("dataset", opts["dataset"])
    for split in (opts["train_split"], opts["eval_split"]):
        spec.check_split(split)
    unknown = sorted(set(opts["data_options"]) - set(getattr(spec, "options", {}) or {}))
    if unknown:
        from ..errors import UnknownNameError

        raise UnknownNameError(f"option of dataset {spec.name!r}", unknown[0], getattr(spec, "options", {}) or {})
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
    from ..memory.checkpointing import parse_components
    from ..memory.quantize import _bitsandbytes, default_components

    parse_components(config.grad_checkpoint, list(backbone.components))
    if config.quantize != "none":
        if config.quantize_components:
            parse_components(config.quantize_components, list(backbone.components), "--quantize-components")
        else:
            default_components(backbone)
        _bitsandbytes()


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` names the parameter ``name`` (a **kwargs catch-all does not count: it may forward
    to a config that rejects it)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_model(backbone, opts: dict[str, Any], *, texts: list[str] | None = None, tokenizer_dir: Path | None = None):
    """The base model of a run, built the same way by ``train`` and ``eval``.

    The random init is seeded with the run's seed, so the frozen weights of an adapter's base model
    can be rebuilt exactly; a tokenizer saved by the run is read back by the backbone's registered
    tokenizer loader (else one is trained on ``texts``).
    """
    from ..backbones.tokenizer_files import load_tokenizer
    from .trainer import seed_everything

    options = dict(opts.get("backbone_options") or {})
    seed_everything(int(opts.get("seed", 0)))
    if opts.get("pretrained"):  # a checkpoint folder brings its own weights and vocabulary
        return backbone.from_pretrained(opts["pretrained"], **options)
    if tokenizer_dir is not None and tokenizer_dir.is_dir() and backbone.tokenizer_loader is not None \
            and any(tokenizer_dir.iterdir()):
        options.setdefault("tokenizer", load_tokenizer(backbone, tokenizer_dir))
    elif texts is not None and backbone.builder is not None and _accepts(backbone.builder, "texts"):
        options.setdefault("texts", texts)
    return backbone.build(**options)


def save_tokenizer(model, folder: Path, backbone) -> None:
    """Keep the model's tokenizer (e.g. a WordPiece vocabulary trained on the data) beside the adapter."""
    from ..backbones.tokenizer_files import save_tokenizer as save

    if backbone.tokenizer_loader is not None:  # only what the backbone can read back is worth keeping
        save(getattr(model, "tokenizer", None), folder, backbone.name)


# What a training run writes into its output folder (``--overwrite`` replaces exactly these).
RUN_FILES = (RUN_CONFIG, "metrics.json", "predictions.json")


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A non-empty output folder is refused unless the run continues (--resume) or replaces (--overwrite)
    what an earlier peftmed run wrote there; files a user put there are never deleted."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                          "--overwrite starts a new one there")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a file; pass a folder")
    if resume or not out.is_dir():
        return
    content = sorted(p.name for p in out.iterdir())
    if content and not overwrite:
        shown = ", ".join(content[:6]) + (" ..." if len(content) > 6 else "")
        raise ConfigError(
            f"output folder {str(out)!r} is not empty (it holds {shown}); pass --resume to continue the run saved "
            f"there, --overwrite to train a new run there (peftmed's files of the earlier run are replaced, nothing "
            f"else is touched), or choose another --output")


def clear_run_outputs(out: Path) -> list[str]:
    """Remove what an earlier peftmed run wrote into ``out`` (and only that); returns what was removed."""
    import shutil

    from ..backbones.tokenizer_files import IDENTITY_FILE
    from .checkpoint import LATEST, is_checkpoint, remove_stale_temporaries

    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        for step in ckpts.glob("step-*"):
            if is_checkpoint(step):
                shutil.rmtree(step)
                removed.append(f"checkpoints/{step.name}")
        if (ckpts / LATEST).is_file():
            (ckpts / LATEST).unlink()
        remove_stale_temporaries(ckpts)
    adapter = out / "adapter"
    for name in ("adapter.json", "adapter.safetensors"):
        if (adapter / name).is_file():
            (adapter / name).unlink()
            removed.append(f"adapter/{name}")
    tok = out / TOKENIZER_DIR
    if (tok / IDENTITY_FILE).is_file() or (tok / "class.txt").is_file():  # a tokenizer peftmed saved
        for name in (IDENTITY_FILE, "class.txt", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json"):
            if (tok / name).is_file():
                (tok / name).unlink()
                removed.append(f"{TOKENIZER_DIR}/{name}")
    return removed


def _load(spec_name: str, split: str, opts: dict[str, Any], registry):
    from ..data import load_records

    return load_records(spec_name, split, data_dir=opts.get("data_dir"), registry=registry,
                        **(opts.get("data_options") or {}))


def run_train(args: argparse.Namespace) -> int:
    # the step lines of --log-every are what a run without a progress bar shows: print them without -v
    logger = logging.getLogger("peftmed.train")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    registry = _registry()
    opts = resolve_options(args)
    backbone, spec, recipe, config, task = _check_before_training(opts, registry)
    return train_task(task, opts, registry, backbone, spec, recipe, config)


def train_task(task, opts: dict[str, Any], registry, backbone, spec, recipe, config) -> int:
    """Train ``recipe`` on ``backbone`` for ``task`` (a registered Task) and evaluate; what ``peftmed train`` runs."""
    from ..model import apply
    from ..tasks import baseline_scores, evaluate
    from . import distributed
    from .checkpoint import write_json_atomic
    from .trainer import Trainer, TrainingInterrupted

    out = Path(opts["output"] or f"runs/{backbone.name}-{spec.name}")
    opts["output"] = str(out)
    main = int(os.environ.get("RANK", "0")) == 0
    check_output(out, resume=opts["resume"], overwrite=opts.get("overwrite", False))
    if opts["resume"]:
        _check_resumable(out, backbone)

    train = _load(spec.name, opts["train_split"], opts, registry)
    test = _load(spec.name, opts["eval_split"], opts, registry)
    verify_images(train + test, where=f"{spec.name} ({opts['train_split']} and {opts['eval_split']})")
    train, test = prepare_records(train, test, opts, spec.name)
    tokenizer_dir = out / TOKENIZER_DIR
    model = build_model(backbone, opts, texts=task.texts(train),
                        tokenizer_dir=tokenizer_dir if opts["resume"] else None)
    pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
    memory = prepare_memory(pm, config)
    task_model = task.wrap(pm)
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
        print(f"train: {len(train)} {task.noun} ({opts['train_split']}), eval: {len(test)} ({opts['eval_split']})",
              file=sys.stderr)

    image_size = int(getattr(task_model, "image_size"))
    test_set = task.dataset(test, image_size)
    eval_batch = config.eval_batch_size or config.batch_size
    tokens = config.max_new_tokens or task.max_new_tokens

    def evaluate_now(m, limit=None, progress=False):
        return evaluate(task, m, test, registry=registry, batch_size=eval_batch, num_beams=config.num_beams,
                        max_new_tokens=tokens, limit=limit, dataset=test_set, progress=progress)

    run_info = {"backbone": backbone.name, "recipe_json": recipe.to_dict(), "dataset": spec.name,
                "data_options": opts["data_options"], "task": task.name}
    trainer = Trainer(task_model, task.dataset(train, image_size), config, output_dir=out,
                      eval_fn=lambda m, limit: evaluate_now(m, limit).scores, run_info=run_info,
                      collate_fn=task.collate)
    trainer.keep_reporter_open = True  # the final evaluation goes to --report-to too
    try:
        result = trainer.train(resume=opts["resume"])
    except TrainingInterrupted as exc:
        if exc.checkpoint is not None:
            exc.args = (f"{exc.args[0]}\n  resume: {resume_command()}",)
        raise
    if not main:
        return 0
    if distributed.is_fsdp(trainer.wrapped):
        trainer.close_reporter()  # a sharded model answers on no single rank: evaluate the adapter
        write_json_atomic(out / "metrics.json", {"task": task.name, "backbone": backbone.name,
                                                 "recipe": recipe.to_text(), "dataset": spec.name,
                                                 "train": result.to_dict(), "memory": memory})
        print(f"adapter: {out / 'adapter'}   (a sharded run; evaluate it with: peftmed eval --adapter "
              f"{out / 'adapter'})")
        return 0
    summary: dict[str, Any] = {"task": task.name, "backbone": backbone.name, "recipe": recipe.to_text(),
                               "dataset": spec.name, "eval_split": opts["eval_split"], "train": result.to_dict(),
                               "trainable": pm.trainable_report().to_dict(), "memory": memory}
    if opts["evaluate"]:
        final = evaluate_now(task_model, progress=config.progress)
        trainer.close_reporter(final.scores)
        baseline = baseline_scores(task, train, test, registry)
        summary.update({"scores": final.scores, task.baseline_name: baseline})
        final.write(out)
        write_json_atomic(out / "metrics.json", summary)
        print(f"{spec.name}/{opts['eval_split']} after {result.step} steps: {final.summary()}")
        print(f"{task.baseline_label} {task.summary(baseline)}")
    else:
        trainer.close_reporter()
        write_json_atomic(out / "metrics.json", summary)
    print(f"adapter: {out / 'adapter'}   metrics: {out / 'metrics.json'}")
    return 0


def prepare_memory(pm, config) -> dict:
    """The run's memory options applied to the adapted model (quantize, base dtype, checkpointing)."""
    from ..memory import prepare_from_config
    from ..runtime import resolve_device

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
    from ..data.instruction import render, render_questions
    from ..data.records import drop_test_questions

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
    from .checkpoint import find_checkpoint, read_meta

    try:
        found = find_checkpoint(out)
    except ConfigError:
        raise
    except PeftmedError as exc:
        raise ConfigError(f"{exc} (or --overwrite to start a new run in this folder)") from None
    before = read_meta(found).get("backbone")
    if before is not None and before != backbone.name:
        raise ConfigError(f"cannot resume {str(out)!r}: its run trained backbone {before!r}, this command asks for "
                          f"{backbone.name!r}; resume with --backbone {before} or train into another --output")


def resume_command() -> str:
    """The command line that continues this run (the one typed, plus --resume)."""
    import shlex

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
    p.add_argument("--batch-size", type=int, default=16, help="questions per batch [default: 16]")
    p.add_argument("--num-beams", type=int, default=3, help="beams of answer generation [default: 3]")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generated text in tokens [default: the task's: 10 for answers, 100 for reports]")
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


def find_run(adapter: Path) -> Path | None:
    """The training output folder an adapter belongs to (the nearest parent with train_config.json)."""
    for folder in [adapter, *adapter.resolve().parents][:5]:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def run_eval(args: argparse.Namespace) -> int:
    from ..model import load_adapter, read_manifest
    from ..tasks import baseline_scores, evaluate, resolve_task
    from .checkpoint import write_json_atomic
    from .distributed import resolve_device

    registry = _registry()
    adapter = Path(args.adapter)
    manifest = read_manifest(adapter)
    run_dir = find_run(adapter)
    opts: dict[str, Any] = json.loads((run_dir / RUN_CONFIG).read_text()) if run_dir else {}
    if run_dir is None:
        log.warning("no %s above %s: the base model is rebuilt with default options and seed 0, so frozen "
                    "weights differ from training unless the recipe trains every tensor", RUN_CONFIG, adapter)
    backbone = registry.backbone(manifest["backbone"])
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
    tokenizer_dir = run_dir / TOKENIZER_DIR if run_dir else None
    model = build_model(backbone, opts, texts=task.texts(train) if train is not None else None,
                        tokenizer_dir=tokenizer_dir)
    pm = load_adapter(model, adapter, backbone=backbone, registry=registry)
    from ..memory import prepare

    device = resolve_device(args.device)
    quantize = args.quantize or opts.get("quantize") or "none"
    prepare(pm, base_dtype=args.base_dtype or opts.get("base_dtype") or "auto", quantize=quantize,
            quantize_components=opts.get("quantize_components"), device=device if quantize != "none" else None)
    task_model = task.wrap(pm)
    task_model.to(device)
    result = evaluate(task, task_model, test, registry=registry, batch_size=args.batch_size,
                      num_beams=args.num_beams, max_new_tokens=args.max_new_tokens or task.max_new_tokens,
                      progress=args.progress)
    print(f"{spec.name}/{args.split} with {manifest['recipe']}: {result.summary()}")
    summary: dict[str, Any] = {"task": task.name, "adapter": str(adapter), "dataset": spec.name, "split": args.split,
                               "recipe": manifest["recipe"], "scores": result.scores}
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
