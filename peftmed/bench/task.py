"""Where the bench meets the rest of peftmed: data, models, batches, evaluation.

Everything the bench needs from the data, backbone and metrics packages goes through the functions
here, so the worker reads as the measurement it is and an API change is absorbed in one place.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import AdapterError, ConfigError


def registry_with(plugins: Sequence[str] = ()):
    """The default registry, plus plugin modules named on the command line (``--plugin MODULE``)."""
    from ..plugins import build_registry, default_registry, set_default_registry

    if not plugins:
        return default_registry()
    modules = []
    for name in plugins:
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
    from ..data import load_records

    train_split, test_split = dataset_splits(registry, job.dataset)
    train = load_records(job.dataset, train_split, data_dir=job.data_dir, registry=registry, **job.train_options)
    test = load_records(job.dataset, test_split, data_dir=job.data_dir, registry=registry, **job.test_options)
    return train, test


def _builder_params(backbone) -> set[str]:
    try:
        return set(inspect.signature(backbone.builder).parameters) if backbone.builder else set()
    except (TypeError, ValueError):
        return set()


def _report(records) -> bool:
    """Whether the records are report-generation records (``peftmed.report``), not questions."""
    return bool(records) and getattr(records[0], "task", "vqa") == "report"


def _texts(records) -> list[str]:
    if _report(records):
        from ..report.commands import training_texts

        return training_texts(records)
    return [t for r in records for t in (r.question, r.answer)]


def task_model(model, records):
    """The model that serves the records' task: report records get the (adapted) model in a ReportModel."""
    if _report(records):
        from ..report import ReportModel

        return ReportModel(model)
    return model


def shared_build_options(backbone, options: dict, train_records) -> dict:
    """Builder options computed once per suite and given to every job.

    A backbone that trains its tokenizer on the dataset text (``texts=``) gets one tokenizer, trained
    here once: every recipe then sees the same token ids, which keeps results comparable (and
    reproducible even where the tokenizer trainer breaks ties differently from run to run).
    """
    params = _builder_params(backbone)
    if not {"texts", "tokenizer"} <= params or {"tokenizer", "vocab_file"} & set(options):
        return {}
    meta = {"device": "meta"} if "device" in params else {}  # only the tokenizer is wanted
    model = backbone.build(**{**options, **meta, "texts": _texts(train_records)})
    tokenizer = getattr(model, "tokenizer", None)
    return {"tokenizer": tokenizer} if tokenizer is not None else {}


def build_model(job, backbone, train_records) -> torch.nn.Module:
    """A fresh model; a backbone whose builder takes ``texts`` gets the training text (tokenizer)."""
    options = {**job.backbone_options, **job.shared_options}
    if "texts" in _builder_params(backbone) and "texts" not in options and "tokenizer" not in options:
        options["texts"] = _texts(train_records)
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


def _image_size(model) -> int:
    size = getattr(model, "image_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"the model ({type(model).__name__}) has no integer image_size; bench needs a VQA model")
    return size


def _dataset(records, model, job):
    from ..data import VQADataset

    if _report(records):
        from ..report import ReportDataset

        return ReportDataset(records, image_size=_image_size(model), cache_dir=job.cache_dir)
    return VQADataset(records, image_size=_image_size(model), cache_dir=job.cache_dir)


def train_batches(records, model, job) -> Iterator[dict]:
    """Endless seeded shuffled batches (each epoch reshuffled), the same order for every recipe."""
    from torch.utils.data import DataLoader

    from ..data import collate

    dataset = _dataset(records, model, job)
    if _report(records):
        from ..report import report_collate as collate
    generator = torch.Generator().manual_seed(job.seed)
    loader = DataLoader(dataset, batch_size=job.batch_size, shuffle=True, collate_fn=collate,
                        generator=generator, drop_last=len(dataset) >= job.batch_size)
    return itertools.chain.from_iterable(itertools.repeat(loader))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(model, records, job, device) -> dict[str, Any]:
    """Generate an answer per test question (``peftmed.train.evaluate``); scores matched by qid."""
    from ..train.evaluate import evaluate as run_eval

    if _report(records):
        from ..report.bench import evaluate_reports_job

        return evaluate_reports_job(model, records, job, _dataset(records, model, job))
    result = run_eval(model, records, batch_size=job.eval_batch_size, num_beams=job.num_beams,
                      max_new_tokens=job.max_new_tokens, progress=job.progress, dataset=_dataset(records, model, job))
    scores = result.scores
    out = {k: (float("nan") if scores.get(k) is None else float(scores[k]))
           for k in ("acc_closed", "acc_open", "acc_overall", "closed_f1", "open_token_f1")}
    out["predictions"] = dict(result.predictions)
    return out


def progress(total, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
