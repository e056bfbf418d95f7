"""One bench job: build a fresh model, apply one recipe through one provider, train it with the Trainer,
evaluate it with the task's metric, measure.

``run_job(job)`` is what each fresh worker process runs (``peftmed.bench.runner`` starts one per
job so the memory figure of a recipe cannot include another's). It never raises for a recipe's own
failure: a recipe the backbone cannot take, peft's errors and out-of-memory come back as the row's
``status`` and ``error``, so the suite goes on.

Training is ``peftmed.train.Trainer`` (the loop ``peftmed train`` runs), with the bench's protocol: a
constant learning rate (no warm-up, no decay), AdamW without weight decay, gradients clipped to 1.0,
and each method's usual learning rate (``Method.default_lr``) unless ``--lr`` is given.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..baselines import apply_peft, parameter_methods
from ..data.records import drop_test_questions
from ..model import apply
from ..plugins import default_registry
from ..recipe import Recipe
from ..runtime import resolve_device, seed_everything
from ..tasks import answer_lengths
from ..train import TrainConfig, Trainer
from . import task as glue
from .memory import MemoryProbe
from .suites import slug

FALLBACK_LR = 1e-3  # a method without a default_lr, and peft's rows of such a method


@dataclass
class Job:
    """Everything a worker needs to run one (recipe, provider) pair; plain data, so it pickles."""

    label: str
    recipe: str
    provider: str  # "peftmed" | "peft"
    backbone: str
    dataset: str
    task: str | None = None  # None: the dataset's
    data_dir: str | None = None
    backbone_options: dict = field(default_factory=dict)
    shared_options: dict = field(default_factory=dict)  # built once per suite (a tokenizer); not in results
    train_test_overlap: str = "drop"  # training records repeating a test question: drop | keep
    train_options: dict = field(default_factory=dict)  # load_records options of the training split
    test_options: dict = field(default_factory=dict)  # ... and of the test split
    steps: int | None = 40
    time_budget: float | None = None  # seconds of training; the first of steps/time reached stops
    batch_size: int = 8
    eval_batch_size: int = 32
    eval_samples: int | None = None  # evaluate on the first N test records (None: all)
    num_beams: int = 1
    max_new_tokens: int | None = None  # None: the task's
    lr: float | None = None  # None: each method's default_lr
    lr_floor: float | None = None  # transfer protocol: no method adapts at less than this (the source's own rate)
    source_options: dict | None = None  # transfer protocol: the source domain's test split, scored too (forgetting)
    source_eval_samples: int | None = None  # ... its first N records
    warmup_steps: int = 2  # steps excluded from the throughput median (allocator, caches)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    source_checkpoint: str | None = None  # transfer protocol: a fully trained model to start from
    save_model: str | None = None  # transfer protocol: save the trained model here (safetensors)
    cache_dir: str | None = None  # shared decoded-image cache
    plugins: tuple[str, ...] = ()  # extra plugin modules to register in the worker
    progress: bool = True
    report_to: str | None = None  # --report-to targets (each job is its own run)
    log_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_job(job: Job) -> dict[str, Any]:
    """Run ``job`` and return its result row (never raises for the recipe's own failure)."""
    row: dict[str, Any] = {"label": job.label, "recipe": job.recipe, "provider": job.provider, "status": "ok",
                           "error": None}
    t0 = time.perf_counter()
    # what a job sets for itself (threads, deterministic algorithms, oneDNN) is put back after it: run in a caller's
    # process, it must not choose the caller's kernels or threads from then on
    settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.mkldnn.enabled)
    try:
        registry = glue.registry_with(job.plugins)
        row.update(_run(job, registry))
    except Exception as exc:  # the row records why; the suite continues
        row["status"] = "oom" if glue.is_oom(exc) else "failed"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        torch.set_num_threads(settings[0])
        torch.use_deterministic_algorithms(settings[1], warn_only=settings[2])
        torch.backends.mkldnn.enabled = settings[3]
    row["job_time_s"] = time.perf_counter() - t0  # the whole job: data, model, training, evaluation
    return row


def _run(job: Job, registry) -> dict[str, Any]:
    device = resolve_device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    backbone = registry.backbone(job.backbone)
    task = registry.get("task", job.task or registry.get("dataset", job.dataset).task)
    train_records, test_records = glue.load_data(job, registry)
    if job.train_test_overlap == "drop":  # the runner said so once for the suite

        train_records = drop_test_questions(train_records, test_records, quiet=True)
    if job.eval_samples:
        test_records = test_records[: job.eval_samples]

    probe = MemoryProbe(device)
    probe.start()
    # what can be made deterministic is: the algorithms (where torch offers a deterministic one) and the threads
    torch.use_deterministic_algorithms(True, warn_only=True)
    if os.environ.get("PEFTMED_ONEDNN", "1") == "0":  # oneDNN's CPU kernels off: a stand-in for another processor
        torch.backends.mkldnn.enabled = False
    seed_everything(job.seed)  # same seed -> same initial weights for every recipe and provider
    model = glue.build_model(job, task, backbone, train_records)
    if job.source_checkpoint:
        glue.load_source(model, job.source_checkpoint)
    total = sum(p.numel() for p in model.parameters())
    model, lr_of, info = _apply(job, model, backbone, registry, total)
    model = task.wrap(model)
    model.to(device)
    lengths = None
    if task.targets is not None:  # the generation length from the training answers, as peftmed train derives it
        lengths = answer_lengths(model, task.targets(train_records), task.targets(test_records),
                                 max_new_tokens=job.max_new_tokens)

    stats = {"steps_done": 0, "train_time_s": 0.0, "step_time_median_s": math.nan, "throughput": math.nan,
             "final_loss": math.nan}
    if lr_of is not None:
        stats = _train(job, task, model, lr_of, train_records)
    peak = probe.peak_mib()
    if job.save_model:
        glue.save_source(getattr(model, "base_model", model), job.save_model)
    t0 = time.perf_counter()
    tokens = lengths.max_new_tokens if lengths is not None else None
    scores = glue.evaluate(task, model, test_records, job, registry, max_new_tokens=tokens)
    if lengths is not None:
        scores.update(max_new_tokens=lengths.max_new_tokens, answers_reachable=lengths.reachable,
                      answers_total=lengths.total)
    if job.source_options is not None:  # forgetting: the same model scored on the source domain
        source_records = glue.load_source_test(job, registry)
        on_source = glue.evaluate(task, model, source_records, job, registry, max_new_tokens=tokens)
        scores["source_predictions"] = on_source.pop("predictions")
        scores.update({f"source_{k}": v for k, v in on_source.items() if k != "metrics_version"})
    return {**info, **stats, **scores, "peak_memory_mib": peak, "memory_method": probe.method,
            "eval_time_s": time.perf_counter() - t0, "n_train": len(train_records), "n_test": len(test_records),
            "device": str(device)}


def _apply(job: Job, model, backbone, registry, total: int):
    """Apply the recipe through the job's provider; returns (model, lr of each tensor, trainable info).

    A recipe that trains nothing (``frozen``) leaves the model as it is (lr None: no training)."""
    recipe = Recipe.parse(job.recipe, components=list(backbone.components))
    row = recipe.row(list(backbone.components), registry)
    if not recipe.trained(backbone.components, registry):
        for p in model.parameters():
            p.requires_grad_(False)
        return model, None, {"trainable": 0, "trainable_percent": 0.0, "total_params": total, "row": row}
    if job.provider == "peftmed":
        pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        report = pm.trainable_report()
        # with --lr every tensor gets it; otherwise the recipe's lr= or each method's default_lr
        options = pm.optimizer_options(lr=job.lr or FALLBACK_LR, weight_decay=0.0, method_lr=job.lr is None)
        rates = {k: (job.lr or max(o["lr"], job.lr_floor or 0.0)) for k, o in options.items()}
        return pm, rates.__getitem__, {"trainable": report.trainable, "trainable_percent": report.percent,
                                       "total_params": report.total_base, "row": row}

    wrapped = apply_peft(model, recipe, backbone, registry)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    method_of = parameter_methods(recipe, backbone, registry)

    def lr_of(name: str) -> float:  # each peft tensor at the rate of the peftmed method it stands for
        return job.lr or max(method_of(name).default_lr or FALLBACK_LR, job.lr_floor or 0.0)

    return wrapped, lr_of, {"trainable": trainable, "trainable_percent": 100.0 * trainable / total,
                            "total_params": total, "row": row}


def _train(job: Job, task, model, lr_of, records) -> dict[str, Any]:
    config = TrainConfig(steps=job.steps, time_budget=job.time_budget, batch_size=job.batch_size,
                         lr=job.lr or FALLBACK_LR, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0,
                         max_grad_norm=1.0, seed=job.seed, device=job.device, precision="fp32",
                         progress=job.progress, log_every=10**9, report_to=job.report_to,
                         run_name=f"{slug(job.label)}.{job.provider}.s{job.seed}")
    data = task.dataset(records, glue.image_size(model), cache_dir=job.cache_dir)
    result = Trainer(model, data, config, collate_fn=task.collate, lr_of=lr_of, log_dir=job.log_dir).train()
    timed = result.step_seconds[job.warmup_steps:] or result.step_seconds
    median = statistics.median(timed) if timed else math.nan
    return {"steps_done": result.step, "train_time_s": result.train_seconds, "step_time_median_s": median,
            "throughput": job.batch_size / median if timed else math.nan,
            "final_loss": statistics.fmean(result.losses[-5:]) if result.losses else math.nan}


def preload() -> None:
    """Imports a worker needs and the default registry, done once in the fork server so each job starts fast."""
    import importlib

    for name in ("torch", "peftmed", "peftmed.model", "peftmed.data", "peftmed.train", "peftmed.tasks"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    default_registry()
