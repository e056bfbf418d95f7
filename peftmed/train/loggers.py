"""``--report-to tensorboard,wandb,mlflow``: training curves in the tools people already watch.

As the HF Trainer's ``report_to``: each step's loss, learning rate per parameter group, gradient norm,
samples/s and peak memory; each evaluation's metrics; the recipe, the trainable report and the config as
the run's hyperparameters. Each target is its own library (TensorBoard through torch's ``SummaryWriter``,
wandb in offline mode, MLflow with a file store), writing under ``OUTPUT/logs/``:

- ``logs/tensorboard/<run>/`` (``tensorboard --logdir OUTPUT/logs/tensorboard``)
- ``logs/wandb/`` (offline; ``wandb sync`` uploads it later)
- ``logs/mlruns/`` (``mlflow ui --backend-store-uri OUTPUT/logs/mlruns``), or ``MLFLOW_TRACKING_URI`` when set

``all`` means every one of them that is installed. Only the main process logs.

A logger is outside the training's critical path: each target runs in its own worker thread, so training
never waits on it. A target whose call fails (a server answering 503, a full disk) or takes longer than
``timeout`` seconds is reported once and disabled; training, checkpoints, the final evaluation and
metrics.json go on. Closing waits at most ``timeout`` seconds per target.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..run.config import parse_targets

log = logging.getLogger("peftmed.train")

DEFAULT_TIMEOUT = 30.0  # seconds one logger call may take before its target is disabled


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


# ---- one library each: open, scalars, close ------------------------------------------------------------
class _TensorBoard:
    def __init__(self, log_dir: Path, run_name: str, hparams: dict, texts: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.hparams = hparams
        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard" / run_name))
        for tag, text in texts.items():
            self.writer.add_text(tag, f"```\n{text}\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, final: dict[str, float]) -> None:
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()
              if v is not None}
        try:
            self.writer.add_hparams(hp, {f"hparam/{k}": v for k, v in final.items()} or {"hparam/done": 1.0},
                                    run_name=".")
        finally:
            self.writer.close()


class _Wandb:
    def __init__(self, log_dir: Path, run_name: str, hparams: dict, texts: dict):
        import wandb

        (log_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(log_dir), name=run_name, config=hparams, reinit="create_new")
        for tag, text in texts.items():
            self.run.summary[tag] = text

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, final: dict[str, float]) -> None:
        self.run.summary.update(final)
        self.run.finish()


class _Mlflow:
    def __init__(self, log_dir: Path, run_name: str, hparams: dict, texts: dict):
        import mlflow

        # MLFLOW_TRACKING_URI when set (a server, a database), else a file store beside the run: no server to
        # start, and mlflow-skinny has no database driver (mlflow 3 asks file stores to opt in by this variable)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (log_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("peftmed")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("peftmed")
        self.run = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for k, v in hparams.items():
            self.client.log_param(self.run, k, str(v)[:500])
        for tag, text in texts.items():
            self.client.log_text(self.run, text, f"{tag}.txt")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.client.log_metric(self.run, k.replace("/", "_"), v, step=step)

    def close(self, final: dict[str, float]) -> None:
        for k, v in final.items():
            self.client.log_metric(self.run, k if k.startswith("final") else f"final_{k}", v)
        self.client.set_terminated(self.run)


TARGET_CLASSES: dict[str, Callable[..., Any]] = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class _Worker:
    """One target's calls, in order, on its own daemon thread. A call that raises or overruns the time
    limit disables the target (reported once); later calls are dropped."""

    def __init__(self, name: str, timeout: float):
        self.name, self.timeout = name, timeout
        self.calls: queue.Queue = queue.Queue()
        self.failed: str | None = None
        self.started: float | None = None  # when the call in progress began
        self.thread = threading.Thread(target=self._serve, name=f"peftmed-logger-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            call = self.calls.get()
            if call is None:
                return
            what, fn = call
            if self.failed is not None:
                continue
            self.started = time.monotonic()
            try:
                fn()
            except BaseException as exc:  # any library error; a logger must never end the run
                self._fail(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            finally:
                self.started = None

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.warning("--report-to %s: %s; this target is disabled, training goes on (checkpoints, evaluation "
                        "and metrics.json are not affected)", self.name, reason)

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        if self.failed is None:
            self.check_time()
        if self.failed is None:
            self.calls.put((what, fn))

    def check_time(self) -> None:
        started = self.started
        if started is not None and time.monotonic() - started > self.timeout:
            self._fail(f"a call has taken more than {self.timeout:g} s (an unreachable server?)")

    def wait(self, deadline: float) -> bool:
        """Wait until every queued call ran (True), the target failed or ``deadline`` passed (False)."""
        done = threading.Event()
        self.calls.put(("", done.set))
        while not done.wait(0.05):
            self.check_time()
            if self.failed is not None or time.monotonic() > deadline:
                if self.failed is None:
                    self._fail(f"closing took more than {self.timeout:g} s")
                return False
        return self.failed is None

    def stop(self) -> None:
        self.calls.put(None)


class Loggers:
    """Sends a run's scalars and hyperparameters to each target, never holding training up (module doc)."""

    def __init__(self, targets, log_dir: str | os.PathLike, run_name: str, hparams: Mapping[str, Any],
                 texts: Mapping[str, str] | None = None, *, timeout: float | None = None):
        self.targets = parse_targets(targets)
        self.timeout = float(timeout if timeout is not None else os.environ.get("PEFTMED_LOGGER_TIMEOUT",
                                                                                  DEFAULT_TIMEOUT))
        self.log_dir = Path(log_dir)
        hparams, texts = _flat(hparams), dict(texts or {})
        self._open: dict[str, Any] = {}
        self._workers: dict[str, _Worker] = {}
        for target in self.targets:
            worker = _Worker(target, self.timeout)
            self._workers[target] = worker

            def open_target(target=target):
                self._open[target] = TARGET_CLASSES[target](self.log_dir, run_name, hparams, texts)

            worker.submit("opening", open_target)
        # the first step's values wait behind the opening calls; a target that cannot open is reported now
        deadline = time.monotonic() + self.timeout
        for worker in self._workers.values():
            worker.wait(deadline)

    @property
    def failed(self) -> dict[str, str]:
        """Targets that were disabled, with the reason."""
        return {n: w.failed for n, w in self._workers.items() if w.failed is not None}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        for name, worker in self._workers.items():
            worker.submit(f"logging step {step}", lambda name=name: self._open[name].scalars(step, values))

    def close(self, final: Mapping[str, float] | None = None) -> None:
        """Send the final values and close every target, waiting at most ``timeout`` seconds each."""
        final = {k: float(v) for k, v in (final or {}).items() if isinstance(v, (int, float))}
        for name, worker in self._workers.items():
            worker.submit("closing", lambda name=name: self._open[name].close(final))
        for worker in self._workers.values():
            worker.wait(time.monotonic() + self.timeout)
            worker.stop()
        self._workers = {}
