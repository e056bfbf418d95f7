"""``--report-to tensorboard,wandb,mlflow``: training curves in the tools people already watch.

As the HF Trainer's ``report_to``: each step's loss, learning rate per parameter group, gradient norm,
samples/s and peak memory; each evaluation's metrics; the recipe, the trainable report and the config as
the run's hyperparameters. Each target is its own library (TensorBoard through torch's ``SummaryWriter``,
wandb in offline mode, MLflow with a file store), writing under ``OUTPUT/logs/``:

- ``logs/tensorboard/<run>/`` (``tensorboard --logdir OUTPUT/logs/tensorboard``)
- ``logs/wandb/`` (offline; ``wandb sync`` uploads it later)
- ``logs/mlruns/`` (``mlflow ui --backend-store-uri OUTPUT/logs/mlruns``), or ``MLFLOW_TRACKING_URI`` when set

``all`` means every one of them that is installed. Only the main process reports.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("peftmed.train")

TARGETS = ("tensorboard", "wandb", "mlflow")
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _installed(target: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(MODULES[target]) is not None


def parse_targets(value) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` / ``"all"`` / ``"none"`` -> the targets; unknown or missing ones are named."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(t for t in TARGETS if _installed(t))
    for name in names:
        if name not in TARGETS:
            raise ConfigError(f"--report-to: unknown target {name!r}; expected a comma list of "
                              f"{', '.join(TARGETS)} (or all, none)")
        if not _installed(name):
            raise ConfigError(f"--report-to {name}: the {MODULES[name]} package is not installed "
                              f"(pip install {MODULES[name]})")
    return tuple(dict.fromkeys(names))


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


class Reporter:
    """Sends a run's scalars and hyperparameters to each target."""

    def __init__(self, targets, log_dir: str | os.PathLike, run_name: str, hparams: Mapping[str, Any],
                 texts: Mapping[str, str] | None = None):
        self.targets = parse_targets(targets)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.hparams = _flat(hparams)
        self.texts = dict(texts or {})
        self._tb = self._wandb = self._mlflow = None
        for target in self.targets:
            try:
                getattr(self, f"_open_{target}")()
            except ConfigError:
                raise
            except Exception as exc:  # each library raises its own types for a setup it refuses
                raise ConfigError(f"--report-to {target}: {type(exc).__name__}: {exc}") from exc

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard" / self.run_name))
        for tag, text in self.texts.items():
            self._tb.add_text(tag, f"```\n{text}\n```", 0)

    def _open_wandb(self) -> None:
        import wandb

        (self.log_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self._wandb = wandb.init(mode="offline", dir=str(self.log_dir), name=self.run_name, config=self.hparams,
                                 reinit="create_new")
        for tag, text in self.texts.items():
            self._wandb.summary[tag] = text

    def _open_mlflow(self) -> None:
        import mlflow

        # MLFLOW_TRACKING_URI when set (a server, a database), else a file store beside the run: no server to
        # start, and mlflow-skinny has no database driver (mlflow 3 asks file stores to opt in by this variable)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.log_dir / "mlruns").resolve().as_uri()
        self._mlflow = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self._mlflow.get_experiment_by_name("peftmed")
        experiment_id = experiment.experiment_id if experiment else self._mlflow.create_experiment("peftmed")
        self._mlflow_run = self._mlflow.create_run(experiment_id, run_name=self.run_name).info.run_id
        for k, v in self.hparams.items():
            self._mlflow.log_param(self._mlflow_run, k, str(v)[:500])
        for tag, text in self.texts.items():
            self._mlflow.log_text(self._mlflow_run, text, f"{tag}.txt")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            for k, v in values.items():
                self._mlflow.log_metric(self._mlflow_run, k.replace("/", "_"), v, step=step)

    def close(self, final: Mapping[str, float] | None = None) -> None:
        final = {k: float(v) for k, v in (final or {}).items() if isinstance(v, (int, float))}
        if self._tb is not None:
            hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()
                  if v is not None}
            self._tb.add_hparams(hp, {f"hparam/{k}": v for k, v in final.items()} or {"hparam/done": 1.0},
                                 run_name=".")
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update(final)
            self._wandb.finish()
        if self._mlflow is not None:
            for k, v in final.items():
                self._mlflow.log_metric(self._mlflow_run, k if k.startswith("final") else f"final_{k}", v)
            self._mlflow.set_terminated(self._mlflow_run)
