"""Where the bench meets the rest of peftmed: the registry, data, models, evaluation.

Everything task-specific comes from the job's registered task (``peftmed.tasks.Task``): its dataset,
batches, tokenizer texts, model wrapper, generation length, metric and score columns. Nothing here
names a task.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data import load_records
from ..errors import AdapterError, ConfigError
from ..plugins import build_registry, default_registry, set_default_registry
from ..tasks import evaluate as run


def registry_with(plugins: Sequence[str] = ()):
    """The default registry, plus plugin modules named on the command line (``--plugin MODULE``)."""
    if not plugins:
        return default_registry()
    modules = []
    for name in plugins:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"--plugin {name!r} is not a module name (expected e.g. my_plugin or pkg.plugin)")
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise ConfigError(f"--plugin {name!r} cannot be imported: {exc}") from exc
    registry = build_registry(extra_plugins=modules)
    set_default_registry(registry)  # so code that asks for the default registry sees the plugin too
    return registry


def dataset_splits(registry, dataset: str) -> tuple[str, str]:
    """(training split, evaluation split) of a registered dataset."""
    spec = registry.get("dataset", dataset)
    splits = tuple(spec.splits)
    evaluation = "test" if "test" in splits else splits[-1]
    return splits[0], evaluation


def load_data(job, registry):
    train_split, test_split = dataset_splits(registry, job.dataset)
    train = load_records(job.dataset, train_split, data_dir=job.data_dir, registry=registry, **job.train_options)
    test = load_records(job.dataset, test_split, data_dir=job.data_dir, registry=registry, **job.test_options)
    return train, test


def load_source_test(job, registry):
    """The transfer protocol's source-domain test records (the first ``source_eval_samples``): what the adapted
    model is scored on for forgetting."""
    _, test_split = dataset_splits(registry, job.dataset)
    records = load_records(job.dataset, test_split, data_dir=job.data_dir, registry=registry, **job.source_options)
    return records[: job.source_eval_samples] if job.source_eval_samples else records


def _builder_params(backbone) -> set[str]:
    try:
        return set(inspect.signature(backbone.builder).parameters) if backbone.builder else set()
    except (TypeError, ValueError):
        return set()


def shared_build_options(task, backbone, options: dict, train_records) -> dict:
    """Builder options computed once per suite and given to every job.

    A backbone that trains its tokenizer on the dataset text (``texts=``) gets one tokenizer, trained
    here once: every recipe then sees the same token ids, which keeps results comparable (and
    reproducible even where the tokenizer trainer breaks ties differently from run to run).
    """
    params = _builder_params(backbone)
    if not {"texts", "tokenizer"} <= params or {"tokenizer", "vocab_file"} & set(options):
        return {}
    meta = {"device": "meta"} if "device" in params else {}  # only the tokenizer is wanted
    model = backbone.build(**{**options, **meta, "texts": task.texts(train_records)})
    tokenizer = getattr(model, "tokenizer", None)
    return {"tokenizer": tokenizer} if tokenizer is not None else {}


def build_model(job, task, backbone, train_records) -> torch.nn.Module:
    """A fresh model; a backbone whose builder takes ``texts`` gets the task's training text (tokenizer)."""
    options = {**job.backbone_options, **job.shared_options}
    if "texts" in _builder_params(backbone) and "texts" not in options and "tokenizer" not in options:
        options["texts"] = task.texts(train_records)
    return backbone.build(**options)


def save_source(model: torch.nn.Module, path) -> None:
    from pathlib import Path

    from safetensors.torch import save_model

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))


def load_source(model: torch.nn.Module, path) -> None:
    """Load the transfer protocol's source model (strict: a mismatch is an error, never dropped)."""
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises its own types for corrupt files / shape mismatches
        raise AdapterError(f"cannot load the source model {str(path)!r}: {exc}") from exc
    if missing or unexpected:
        raise AdapterError(f"source model {str(path)!r} does not match this backbone: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def image_size(model) -> int:
    size = getattr(model, "image_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"the model ({type(model).__name__}) has no integer image_size; bench needs a model that "
                          f"reads images")
    return size


def evaluate(task, model, records, job, registry, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Predictions for the test records and the task's scores (floats; NaN where the metric gives none)."""
    dataset = task.dataset(records, image_size(model), cache_dir=job.cache_dir)
    tokens = max_new_tokens or job.max_new_tokens or task.max_new_tokens
    result = run(task, model, records, registry=registry, batch_size=job.eval_batch_size, num_beams=job.num_beams,
                 max_new_tokens=tokens, progress=job.progress, dataset=dataset)
    scores = result.scores
    out: dict[str, Any] = {c.key: (math.nan if scores.get(c.key) is None else float(scores[c.key]))
                           for c in task.columns}
    if "metrics_version" in scores:
        out["metrics_version"] = scores["metrics_version"]
    out["predictions"] = dict(result.predictions)
    return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
