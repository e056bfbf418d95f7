"""Run a suite: check it, plan the jobs, run each in a fresh process, write results as they finish.

    from peftmed.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(recipes=["*=layernorm", "F|LoRA|LoRA"], steps=20))

Every check that can fail on the user's input (unknown backbone, dataset, recipe, method or option;
a results folder from another version or configuration) runs before anything is trained. Each
(recipe, provider) job runs in a new worker process started from a fork server that has already
imported torch and peftmed, so a job starts in well under a second and its peak memory is its own.
Rows are written per job, atomically, so an interrupted suite resumes (``resume=True``) from the
jobs already done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..baselines import peft_equivalent, peft_version
from ..data import load_records
from ..data.images import verify_images
from ..data.records import drop_test_questions
from ..errors import ConfigError, UnknownNameError
from ..files import check_output_path
from ..kernels import build
from ..recipe import Recipe
from ..run.config import parse_targets
from ..tasks import build_options, check_backbone, resolve_task
from . import report, results
from . import task as glue
from .load import OtherWork, busy_note, load_average
from .suites import SUITE_TASKS, SuiteEntry, builtin_suite, check_suite, for_backbone
from .summary import efficiency, forgetting, forgetting_text, pairwise, summarise, winner
from .worker import Job, run_job

DEFAULT_BACKBONE = "miss-tiny"
DEFAULT_DATASET = "phantom"


@dataclass
class BenchConfig:
    """What to run. Defaults are the no-argument ``peftmed bench`` (sized for a 2-core CPU)."""

    backbone: str = DEFAULT_BACKBONE
    dataset: str = DEFAULT_DATASET
    task: str | None = None  # the dataset's task unless given (a suite names its own)
    data_dir: str | None = None
    device: str = "auto"
    suite: str | None = None  # a built-in suite name ("default" when no recipes are given)
    recipes: list[SuiteEntry | str] = field(default_factory=list)  # explicit recipes (or from a suite file)
    steps: int | None = 40  # optimizer steps per recipe (the budget; reproducible)
    time_budget: float | None = None  # seconds per recipe instead of / as well as steps
    batch_size: int = 8
    eval_batch_size: int = 32
    eval_samples: int | None = 200  # score the first N test questions (None: the whole test split)
    num_beams: int = 1  # 1: greedy answers (the bench compares methods, not decoders)
    max_new_tokens: int | None = None  # None: the task's
    lr: float | None = None  # None: each method's default_lr
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # several seeds per recipe (None: just ``seed``)
    peft: bool = True  # also run the huggingface/peft baseline where it has the method
    output: str | None = None  # results folder (default bench-results/<timestamp>)
    resume: bool = False
    backbone_options: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)  # load_records options of both splits
    transfer: tuple[dict, dict] | None = None  # (source options, target options) of the dataset
    source_steps: int = 400  # steps of full training on the source domain (transfer protocol)
    source_lr: float = 2e-3  # learning rate of that training (from random weights: higher than adaptation's)
    source_batch_size: int = 32  # batch size of that training
    source_eval_samples: int | None = 300  # forgetting: the source-domain test records scored after adaptation
    threads: int | None = 1  # torch CPU threads per job: fixed, so figures do not depend on the machine's count
    workers: int | None = None  # jobs run side by side (None: one per core, at most 2 on a CPU, 1 on a GPU)
    isolate: bool = True  # one fresh process per job (honest CPU memory); False: in this process
    train_test_overlap: str = "drop"  # training records that repeat a test question: drop | keep
    plugins: tuple[str, ...] = ()  # extra plugin modules (e.g. a backbone of your own)
    progress: bool = True
    report_to: str | None = None  # tensorboard, wandb, mlflow: each recipe's curves as its own run

    def validate(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ConfigError("give a budget: --steps N and/or --time-budget SECONDS")
        for name in ("steps", "threads", "batch_size", "eval_batch_size", "num_beams", "max_new_tokens", "eval_samples",
                     "source_steps", "source_batch_size", "workers", "source_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"time_budget must be > 0 seconds, got {self.time_budget!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or any(not isinstance(x, int) or x < 0 for x in self.seeds)):
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds!r}")
        if self.train_test_overlap not in ("drop", "keep"):
            raise ConfigError(f"train_test_overlap must be drop or keep, got {self.train_test_overlap!r}")
        if self.report_to is not None:
            parse_targets(self.report_to)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seeds) if self.seeds else (self.seed,)

    def settings(self) -> dict[str, Any]:
        """What makes two runs comparable (resume refuses a folder whose settings differ)."""
        keys = ("backbone", "dataset", "task", "data_dir", "device", "threads", "steps", "time_budget", "batch_size", "eval_samples",
                "num_beams", "max_new_tokens", "lr", "seed", "seeds", "backbone_options", "dataset_options", "transfer",
                "source_steps", "source_lr", "source_batch_size", "source_eval_samples", "train_test_overlap")
        return json.loads(results.dumps({k: getattr(self, k) for k in keys}))


def default_output() -> str:
    return str(Path("bench-results") / time.strftime("%Y%m%d-%H%M%S"))


def plan(config: BenchConfig, registry) -> list[SuiteEntry]:
    """Check everything the user typed; raises before any training with what exists."""
    config.validate()
    backbone = registry.backbone(config.backbone)
    spec = registry.get("dataset", config.dataset)
    task = resolve_task(registry, config.task or SUITE_TASKS.get(config.suite or ""), spec)
    check_backbone(task, backbone)
    config.task = task.name
    config.backbone_options = build_options(task, backbone, config.backbone_options)
    entries = [e if isinstance(e, SuiteEntry) else SuiteEntry(e) for e in config.recipes]
    builtin = not entries
    if builtin:
        entries = [for_backbone(e, backbone.components) for e in builtin_suite(config.suite or "default")]
        # a built-in suite lists methods some installations lack (a plugin not installed): skip those rows
        entries = [e for e in entries if not _missing_methods(e, backbone, registry)]
    return check_suite(entries, backbone, registry)


def _missing_methods(entry: SuiteEntry, backbone, registry) -> list[str]:
    try:
        recipe = Recipe.parse(entry.recipe, components=list(backbone.components))
        calls = [c for cs in recipe.resolve(backbone.components).values() for c in cs]
    except Exception:
        return []  # check_suite reports it
    missing = []
    for call in calls:
        try:
            registry.method(call.name)
        except UnknownNameError:
            missing.append(call.name)
    return missing


def _peft_reason(entry: SuiteEntry, backbone, registry) -> str | None:
    recipe = Recipe.parse(entry.recipe, list(backbone.components))
    if not recipe.trained(backbone.components, registry):
        return "nothing is trained"
    if peft_version() is None:
        return "huggingface/peft is not installed"
    return peft_equivalent(recipe, backbone, registry)


def _jobs_for(config: BenchConfig, entry: SuiteEntry, provider: str, folder: Path, source: str | None,
             shared: dict | None = None, seed: int | None = None) -> Job:
    train_opts, test_opts = dict(config.dataset_options), dict(config.dataset_options)
    if config.transfer:
        train_opts.update(config.transfer[1])
        test_opts.update(config.transfer[1])
    return Job(label=entry.name, recipe=entry.recipe, provider=provider, backbone=config.backbone,
               dataset=config.dataset, task=config.task, data_dir=config.data_dir,
               train_test_overlap=config.train_test_overlap, backbone_options=dict(config.backbone_options),
               train_options=train_opts, test_options=test_opts, steps=config.steps,
               time_budget=config.time_budget, batch_size=config.batch_size,
               eval_batch_size=config.eval_batch_size, eval_samples=config.eval_samples,
               num_beams=config.num_beams, max_new_tokens=config.max_new_tokens, lr=config.lr,
               seed=config.seed if seed is None else seed,
               device=config.device, threads=config.threads, source_checkpoint=source, cache_dir=str(folder / ".cache"),
               plugins=tuple(config.plugins), progress=config.progress, shared_options=dict(shared or {}),
               report_to=config.report_to, log_dir=str(folder / "logs") if config.report_to else None,
               lr_floor=config.source_lr if config.transfer else None,
               source_options={**config.dataset_options, **config.transfer[0]} if config.transfer else None,
               source_eval_samples=config.source_eval_samples if config.transfer else None)


def fingerprint(job: Job) -> dict[str, Any]:
    data = job.to_dict()
    for key in ("shared_options", "progress", "cache_dir", "source_checkpoint", "save_model", "plugins", "report_to",
                "log_dir"):
        data.pop(key)
    data["transfer_source"] = bool(job.source_checkpoint)
    return data


class _Pool:
    """Runs jobs in fresh processes forked from a preloaded fork server, ``workers`` at a time; ``submit``
    returns a future whose result is the job's row (a worker that died is an "oom" row, never an exception)."""

    def __init__(self, isolate: bool, workers: int = 1):
        self.isolate, self.workers = isolate, max(1, workers)
        self.executor = None

    def submit(self, job: Job):
        if not self.isolate:
            return _Deferred(job)  # runs when its result is asked for: rows are saved as they finish
        if self.executor is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["peftmed.bench.preload"])
            self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, max_tasks_per_child=1)
        future = self.executor.submit(run_job, job)
        out: Future = Future()

        def relay(f):
            try:
                out.set_result(f.result())
            except BrokenProcessPool:
                out.set_result({"label": job.label, "recipe": job.recipe, "provider": job.provider, "status": "oom",
                                "error": "the worker process died (killed by the system, most likely out of memory)"})
            except BaseException as exc:  # cancelled at shutdown (an interrupted suite)
                out.set_exception(exc)

        future.add_done_callback(relay)
        return out

    def run(self, job: Job) -> dict[str, Any]:
        return self.submit(job).result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


class _Deferred:
    """A job run in this process when its result is first asked for (``isolate=False``)."""

    def __init__(self, job: Job):
        self.job, self.row = job, None

    def result(self) -> dict[str, Any]:
        if self.row is None:
            self.row = run_job(self.job)
        return self.row


def _workers(config: BenchConfig) -> int:
    if config.workers:
        return config.workers
    if config.device.startswith("cuda"):
        return 1  # one GPU: jobs would share it
    return max(1, min(2, (os.cpu_count() or 1) // max(1, config.threads or 1)))


def run_bench(config: BenchConfig, registry=None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suite; returns the results document (also written to ``config.output``)."""
    registry = registry or glue.registry_with(config.plugins)
    echo = echo or report.echo
    entries = plan(config, registry)
    backbone = registry.backbone(config.backbone)
    task = registry.get("task", config.task)
    if config.device == "auto":
        import torch

        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(config.output or default_output())
    _prepare_folder(folder, config)
    meta = results.run_metadata(dataclasses.asdict(config) | {"settings": config.settings()}, registry)
    meta["suite"] = config.suite or ("custom" if config.recipes else "default")
    meta["recipes"] = [dataclasses.asdict(e) for e in entries]
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S")

    pool = _Pool(config.isolate, _workers(config))
    meta["workers"], meta["threads"] = pool.workers, config.threads
    meta["load_average_start"] = load_average()
    other_work = OtherWork()
    rows: list[dict[str, Any]] = []
    predictions: dict[tuple[str, str, int], dict] = {}
    source_predictions: dict[tuple[str, str, int], dict] = {}
    start = time.perf_counter()
    seeds = config.seed_list
    try:
        shared = _shared_options(config, backbone, registry)
        meta["kernel_builds"] = prebuild_kernels(config.device, echo)
        # under the transfer protocol each seed's jobs start as soon as that seed's source model is trained
        sources = _source_models(config, folder, pool, echo, shared, registry) if config.transfer else {}
        seed_text = f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
        echo(f"peftmed bench: {len(entries)} recipes on {config.backbone} / {config.dataset}, device "
             f"{config.device}, budget {report.budget_text(config)}, {seed_text}, {pool.workers} job(s) at a time "
             f"x {config.threads or 'default'} thread(s); results -> {folder}")
        planned = []  # (entry, reason, [[job, seed, provider, future or finished row or None (not submitted)]])
        for entry in entries:
            providers = ["peftmed"]
            reason = _peft_reason(entry, backbone, registry) if config.peft else "disabled (--no-peft)"
            if reason is None:
                providers.append("peft")
            # every seed has its own source model, so even a recipe that trains nothing is scored per seed
            entry_seeds = seeds if (_trains(entry, backbone, registry) or config.transfer) else seeds[:1]
            jobs = []
            for seed in entry_seeds:
                for provider in providers:
                    if provider == "peft" and seed != seeds[0]:
                        continue  # peft is the speed, memory and accuracy check beside one seed's rows
                    jobs.append([None, seed, provider, None])
            planned.append((entry, reason, jobs))

        def submit(seed: int, source: str | None) -> None:
            for entry, _, jobs in planned:
                for item in jobs:
                    if item[1] != seed:
                        continue
                    job = _jobs_for(config, entry, item[2], folder, source, shared, seed)
                    row = results.load_job(folder, job.label, item[2], fingerprint(job), seed) if config.resume \
                        else None
                    item[0], item[3] = job, (row if row is not None else pool.submit(job))

        if config.transfer:
            for seed, path in _finished(sources, echo, registry.get("task", config.task)):
                submit(seed, path)
        else:
            for seed in seeds:
                submit(seed, None)
        echo(report.table_header(task))
        for entry, reason, jobs in planned:  # in suite order, as each recipe's jobs finish
            done = []
            for job, seed, provider, pending in jobs:
                if isinstance(pending, dict):
                    row = pending
                    row["resumed"] = True
                    preds = results.load_predictions(folder, job.label, provider, seed)
                    source_preds = results.load_predictions(folder, job.label, provider, seed, source=True)
                else:
                    row = pending.result()
                    row["seed"] = seed
                    preds, source_preds = row.get("predictions"), row.get("source_predictions")
                    results.save_job(folder, row, fingerprint(job), seed)
                    row.pop("predictions", None)
                    row.pop("source_predictions", None)
                if preds is not None:
                    predictions[(job.label, provider, seed)] = preds
                if source_preds is not None:
                    source_predictions[(job.label, provider, seed)] = source_preds
                if reason is not None:
                    row["peft_note"] = reason
                done.append(row)
            rows.extend(done)
            for seed in seeds:
                line = [r for r in done if r.get("seed") == seed]
                if line:
                    echo(report.table_line(line, task) + (f"   (seed {seed})" if len(seeds) > 1 else ""))
            meta["elapsed_s"] = time.perf_counter() - start
            results.write_results(folder, meta, rows)
    finally:
        pool.close()
    meta["load_average_end"] = load_average()
    meta["other_work_cores"] = other_work.stop()
    records = _test_records(config, registry)
    summary = summarise(rows, task, records, predictions)
    pairwise(summary, task, records, predictions)
    if config.transfer and source_predictions:
        source_records = _source_records(config, registry)
        forgetting(summary, task, source_records, source_predictions)
        meta["forgetting"] = forgetting_text(summary, task, source_records, source_predictions)
    busy = busy_note(meta)
    if busy:
        meta["load_warning"] = busy
        echo(busy)
    reach = answers_note(rows)
    if reach:
        meta["answers"] = reach
    meta["elapsed_s"] = time.perf_counter() - start
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results.write_results(folder, meta, rows, summary)
    data = results.read_results(folder)
    report.write_report(folder, data, task)
    echo("\n" + report.text_table(data["summary"], task))
    echo(f"\n{winner(data['summary'], task)['text']}\n{efficiency(data['summary'], task)}")
    if meta.get("forgetting"):
        echo(meta["forgetting"])
    if meta.get("answers"):
        echo(meta["answers"])
    echo(f"wrote {folder / 'results.json'}, results.csv, report.md and plots/ in {meta['elapsed_s']:.0f} s")
    return data


def answers_note(rows: list[dict[str, Any]]) -> str | None:
    """How many test answers generation could reach (the same for every job: one model family, one tokenizer);
    a warning when any could not."""
    done = [r for r in rows if isinstance(r.get("answers_total"), (int, float)) and r.get("answers_total")]
    if not done:
        return None
    row = min(done, key=lambda r: r["answers_reachable"])
    text = (f"answers: {int(row['answers_reachable'])} of {int(row['answers_total'])} test answers are reachable "
            f"within {int(row['max_new_tokens'])} generated tokens (derived from the training answers)")
    if row["answers_reachable"] < row["answers_total"]:
        text = "warning: " + text + "; the others can never be answered right"
    return text


def _trains(entry: SuiteEntry, backbone, registry) -> bool:
    return bool(Recipe.parse(entry.recipe, list(backbone.components)).trained(backbone.components, registry))


def _source_records(config: BenchConfig, registry) -> list:
    """The source-domain test records every adapted model was scored on for forgetting."""
    _, test_split = glue.dataset_splits(registry, config.dataset)
    options = {**config.dataset_options, **config.transfer[0]}
    records = load_records(config.dataset, test_split, data_dir=config.data_dir, registry=registry, **options)
    return records[: config.source_eval_samples] if config.source_eval_samples else records


def _test_records(config: BenchConfig, registry) -> list:
    """The test records every job answered (the target split, its first eval_samples)."""
    _, test_split = glue.dataset_splits(registry, config.dataset)
    options = {**config.dataset_options, **(config.transfer[1] if config.transfer else {})}
    records = load_records(config.dataset, test_split, data_dir=config.data_dir, registry=registry, **options)
    return records[: config.eval_samples] if config.eval_samples else records


def prebuild_kernels(device: str, echo) -> list[dict[str, Any]]:
    """Compile (or load from the cache) the C++ extensions auto would use on ``device`` before any job is
    timed, so no recipe's training time contains a build. Returns what happened, for the report."""
    done = []
    for name, spec in build.EXTENSIONS.items():
        if spec["cuda"] != device.startswith("cuda") or not build.can_compile(cuda=spec["cuda"])[0]:
            continue
        fresh = not any(build.build_folder(name).glob("*.so"))
        t0 = time.perf_counter()
        try:
            build.load_extension(name)
        except Exception as exc:  # a failed build falls back to torch in the jobs; say so, don't stop
            done.append({"extension": name, "built": False, "error": str(exc).splitlines()[0]})
            echo(f"kernels: {name} failed to build ({str(exc).splitlines()[0]}); jobs use the torch fallback")
            continue
        seconds = time.perf_counter() - t0
        done.append({"extension": name, "built": fresh, "seconds": round(seconds, 1)})
        if fresh:
            echo(f"kernels: compiled {name} in {seconds:.0f} s, before any timing")
    return done


def _prepare_folder(folder: Path, config: BenchConfig) -> None:
    existing = results.check_compatible(folder, must_exist=False)
    if existing is not None:
        if not config.resume:
            raise ConfigError(f"results folder {str(folder)!r} already holds results; pass --resume to continue "
                              f"it, or choose another --output")
        before = existing.get("meta", {}).get("config", {}).get("settings", {})
        now = config.settings()
        diff = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k]}
        if diff:
            raise ConfigError(
                f"cannot resume {str(folder)!r}: its settings differ: "
                + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            )
    elif folder.exists() and any(p for p in folder.iterdir() if p.name not in ("runs", "predictions", ".cache",
                                                                               "source")):
        raise ConfigError(f"output folder {str(folder)!r} exists and is not a bench results folder")
    check_output_path(folder, flag="--output", kind="folder")
    folder.mkdir(parents=True, exist_ok=True)


def _shared_options(config: BenchConfig, backbone, registry) -> dict:
    """Builder options shared by every job of the suite (see glue.shared_build_options); every image of the
    suite's data is decoded once here, so a bad file fails the suite before any job starts, named."""
    task = registry.get("task", config.task)
    train_split, test_split = glue.dataset_splits(registry, config.dataset)
    source = {**config.dataset_options, **(config.transfer[0] if config.transfer else {})}
    target = {**config.dataset_options, **(config.transfer[1] if config.transfer else {})}

    def load(split, options):
        return load_records(config.dataset, split, data_dir=config.data_dir, registry=registry, **options)


    records = load(train_split, source)
    target_train, target_test = load(train_split, target), load(test_split, target)
    verify_images(records + target_train + target_test, where=f"{config.dataset} (bench data)")
    if config.train_test_overlap == "drop":  # one log line for the suite; every job drops the same records
        drop_test_questions(target_train, target_test, where=f"{config.dataset} training data (every recipe)")
    return glue.shared_build_options(task, backbone, dict(config.backbone_options), records)


def _source_models(config: BenchConfig, folder: Path, pool: _Pool, echo, shared: dict, registry) -> dict:
    """Transfer protocol: train the backbone fully on the source domain once per seed (each seed its own source
    model: initial weights and data order), side by side; every recipe of a seed starts from that seed's.
    Returns seed -> (path, the training job's future or None when a finished one is reused)."""
    pending = {}
    for seed in config.seed_list:
        path = folder / "source" / f"model-s{seed}.safetensors"
        job = _jobs_for(config, SuiteEntry("*=full", "source (full)"), "peftmed", folder, None, shared, seed)
        job.train_options = {**config.dataset_options, **config.transfer[0]}
        job.test_options = {**config.dataset_options, **config.transfer[0]}
        job.steps, job.time_budget = config.source_steps, None
        job.lr, job.batch_size, job.lr_floor, job.source_options = config.source_lr, config.source_batch_size, None, None
        job.eval_samples = config.source_eval_samples
        job.save_model = str(path)
        marker = path.with_suffix(".json")
        if config.resume and path.is_file() and marker.is_file() and \
                json.loads(marker.read_text()).get("fingerprint") == json.loads(results.dumps(fingerprint(job))):
            echo(f"transfer: reusing the source model of seed {seed} ({path})")
            pending[seed] = (str(path), job, marker, None)
            continue
        pending[seed] = (str(path), job, marker, pool.submit(job))
    todo = [seed for seed, item in pending.items() if item[3] is not None]
    if todo:
        echo(f"transfer: training {config.backbone} fully on {config.transfer[0]} for {config.source_steps} steps, "
             f"seed(s) {', '.join(map(str, todo))}; each seed adapts to {config.transfer[1]} as soon as its model is "
             f"trained")
    return pending


def _finished(sources: dict, echo, task):
    """(seed, source model path) as each source model is trained (a reused one at once); a failed one stops."""
    primary = next(c for c in task.columns if c.key == task.primary)
    ready = [seed for seed, item in sources.items() if item[3] is None]
    for seed in ready:
        yield seed, sources[seed][0]
    waiting = {item[3]: seed for seed, item in sources.items() if item[3] is not None}
    deferred = any(isinstance(f, _Deferred) for f in waiting)
    for future in (list(waiting) if deferred else as_completed(waiting)):
        seed = waiting[future]
        path, job, marker, _ = sources[seed]
        row = future.result()
        if row["status"] != "ok":
            raise ConfigError(f"transfer: training the source model of seed {seed} failed: {row['error']}")
        value = row.get(task.primary, math.nan)
        echo(f"transfer: source model of seed {seed}: {primary.header} {value:.3f} on the source domain")
        results.write_atomic(marker, results.dumps({"fingerprint": fingerprint(job), task.primary: value}))
        yield seed, path