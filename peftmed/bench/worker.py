"""One bench job: build a fresh model, apply one recipe through one provider, train, evaluate, measure.

``run_job(job)`` is what each fresh worker process runs (``peftmed.bench.runner`` starts one per
job so the memory figure of a recipe cannot include another's). It never raises for a recipe's own
failure: a recipe the backbone cannot take, peft's errors and out-of-memory come back as the row's
``status`` and ``error``, so the suite goes on.
"""

from __future__ import annotations

import importlib
import math
import random
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import task
from .memory import MemoryProbe
from .suites import FROZEN

PROVIDERS = ("peftmed", "peft")

# Learning rate per method when --lr is not given: methods that train few, freshly initialised
# parameters need a larger step than those that move pretrained weights. A recipe mixing methods
# (T|T|LoRA) trains each method's parameters with its own rate (one AdamW parameter group each).
DEFAULT_LR = {"full": 1e-4, "ffn": 1e-4, "attention": 1e-4, "layernorm": 1e-3, "bitfit": 1e-3,
              "lora": 1e-3, "ia3": 3e-3, "prefix": 3e-3, "ptuning-v2": 3e-3}
FALLBACK_LR = 1e-3  # a third-party method not in the table


@dataclass
class Job:
    """Everything a worker needs to run one (recipe, provider) pair; plain data, so it pickles."""

    label: str
    recipe: str
    provider: str  # "peftmed" | "peft"
    backbone: str
    dataset: str
    data_dir: str | None = None
    backbone_options: dict = field(default_factory=dict)
    shared_options: dict = field(default_factory=dict)  # built once per suite (a tokenizer); not in results
    train_options: dict = field(default_factory=dict)  # load_records options of the training split
    test_options: dict = field(default_factory=dict)  # ... and of the test split
    steps: int | None = 40
    time_budget: float | None = None  # seconds of training; the first of steps/time reached stops
    batch_size: int = 8
    eval_batch_size: int = 32
    eval_samples: int | None = None  # evaluate on the first N test records (None: all)
    num_beams: int = 1
    max_new_tokens: int = 10
    lr: float | None = None  # None: DEFAULT_LR per method
    warmup_steps: int = 2  # steps excluded from the throughput median (allocator, caches)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    source_checkpoint: str | None = None  # transfer protocol: a fully trained model to start from
    save_model: str | None = None  # transfer protocol: save the trained model here (safetensors)
    cache_dir: str | None = None  # shared decoded-image cache
    plugins: tuple[str, ...] = ()  # extra plugin modules to register in the worker
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def run_job(job: Job) -> dict[str, Any]:
    """Run ``job`` and return its result row (never raises for the recipe's own failure)."""
    row: dict[str, Any] = {"label": job.label, "recipe": job.recipe, "provider": job.provider, "status": "ok",
                           "error": None}
    try:
        registry = task.registry_with(job.plugins)
        row.update(_run(job, registry))
    except Exception as exc:  # the row records why; the suite continues
        row["status"] = "oom" if task.is_oom(exc) else "failed"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        row["traceback"] = traceback.format_exc(limit=6)
    return row


def _run(job: Job, registry) -> dict[str, Any]:
    device = resolve_device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    backbone = registry.backbone(job.backbone)
    train_records, test_records = task.load_data(job, registry)
    if job.eval_samples:
        test_records = test_records[: job.eval_samples]

    probe = MemoryProbe(device)
    probe.start()
    seed_everything(job.seed)  # same seed -> same initial weights for every recipe and provider
    model = task.build_model(job, backbone, train_records)
    if job.source_checkpoint:
        task.load_source(model, job.source_checkpoint)
    total = sum(p.numel() for p in model.parameters())
    model, groups, info = _apply(job, model, backbone, registry, total)
    model = task.task_model(model, train_records)  # e.g. a ReportModel for report datasets
    model.to(device)

    stats = {"steps_done": 0, "train_time_s": 0.0, "step_time_median_s": math.nan, "throughput": math.nan,
             "final_loss": math.nan}
    if groups:
        stats = _train(job, model, groups, train_records, device)
    peak = probe.peak_mib()
    if job.save_model:
        task.save_source(getattr(model, "base_model", model), job.save_model)
    t0 = time.perf_counter()
    scores = task.evaluate(model, test_records, job, device)
    return {**info, **stats, **scores, "peak_memory_mib": peak, "memory_method": probe.method,
            "eval_time_s": time.perf_counter() - t0, "n_train": len(train_records), "n_test": len(test_records),
            "device": str(device)}


def _apply(job: Job, model, backbone, registry, total: int):
    """Apply the recipe through the job's provider; returns (model, param groups, trainable info)."""
    from ..model import apply
    from ..recipe import Recipe

    if job.recipe.strip() == FROZEN or not Recipe.parse(job.recipe, list(backbone.components)).resolve(
            backbone.components):
        for p in model.parameters():
            p.requires_grad_(False)
        return model, [], {"trainable": 0, "trainable_percent": 0.0, "total_params": total, "row": "F|F|F"}
    recipe = Recipe.parse(job.recipe, components=list(backbone.components))
    row = recipe.row(list(backbone.components), registry)
    if job.provider == "peftmed":
        pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        report = pm.trainable_report()
        groups = _peftmed_groups(job, pm, registry)
        return pm, groups, {"trainable": report.trainable, "trainable_percent": report.percent,
                            "total_params": report.total_base, "row": row}
    from ..baselines import apply_peft

    wrapped = apply_peft(model, recipe, backbone, registry)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    method = _single_method(recipe, backbone, registry)
    groups = [{"params": params, "lr": job.lr or DEFAULT_LR.get(method, FALLBACK_LR)}]
    full = [p for n, p in wrapped.named_parameters() if p.requires_grad and "modules_to_save." in n]
    if full and method != "full":  # components trained fully (T) get the full-training rate, as in peftmed
        ids = {id(p) for p in full}
        groups = [{"params": [p for p in params if id(p) not in ids], "lr": groups[0]["lr"]},
                  {"params": full, "lr": job.lr or DEFAULT_LR["full"]}]
    return wrapped, groups, {"trainable": trainable, "trainable_percent": 100.0 * trainable / total,
                             "total_params": total, "row": row}


def _single_method(recipe, backbone, registry) -> str:
    names = [registry.method(c.name).name for calls in recipe.resolve(backbone.components).values() for c in calls]
    rest = [n for n in names if n != "full"]
    return rest[0] if rest else "full"


def _peftmed_groups(job: Job, pm, registry) -> list[dict]:
    """One AdamW parameter group per method of the recipe, each at that method's learning rate."""
    by_lr: dict[float, list] = {}
    seen: set[int] = set()
    for applied in pm.adapters[pm.active_adapter].applied:
        lr = job.lr or DEFAULT_LR.get(applied.method.name, FALLBACK_LR)
        for p in applied.tensors(pm, pm.active_adapter).values():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                by_lr.setdefault(lr, []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in by_lr.items()]


def _train(job: Job, model, groups, records, device) -> dict[str, Any]:
    from ..errors import PeftmedError

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    batches = task.train_batches(records, model, job)
    model.train()
    step_times, losses = [], []
    budget_steps = job.steps if job.steps else None
    bar = task.progress(total=budget_steps, desc=f"{job.label} [{job.provider}]", enabled=job.progress)
    start = time.perf_counter()
    step = 0
    while True:
        if budget_steps is not None and step >= budget_steps:
            break
        if job.time_budget is not None and time.perf_counter() - start >= job.time_budget:
            break
        t0 = time.perf_counter()
        batch = task.to_device(next(batches), device)
        loss = model.compute_loss(batch)
        if not torch.isfinite(loss):
            raise PeftmedError(f"loss became {loss.item()} at step {step}; lower the learning rate (--lr)")
        loss.backward()
        if step == 0 and not any(p.grad is not None for p in params):
            # the trap of the reference code: a method wired into a path the loss never reaches
            raise PeftmedError("the trainable parameters receive no gradient: the method is inert on this model")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_time = time.perf_counter() - start
    timed = step_times[job.warmup_steps:] or step_times
    median = statistics.median(timed) if timed else math.nan
    return {"steps_done": step, "train_time_s": train_time, "step_time_median_s": median,
            "throughput": job.batch_size / median if timed else math.nan,
            "final_loss": statistics.fmean(losses[-5:]) if losses else math.nan}


def preload() -> None:
    """Imports a worker needs, done once in the fork server so each job starts fast."""
    for name in ("torch", "peftmed", "peftmed.model", "peftmed.data"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
