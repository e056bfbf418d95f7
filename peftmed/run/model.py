"""A run's model: the base model built as the run built it, and an adapter of the run put back on it.

``build_model`` is what ``peftmed train`` calls; ``load_adapted`` is what ``eval``, ``predict``, ``merge``
and ``PeftModel``-level users call to ask or ship a trained adapter: the same backbone, build options, seed
(the random init of the frozen weights), ``--pretrained`` folder and tokenizer, so the frozen weights are
exactly the training run's.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import ConfigError
from ..memory import prepare
from ..model import load_adapter, read_manifest
from ..plugins import default_registry
from ..runtime import resolve_device, seed_everything
from ..tokenizer_files import load_tokenizer
from ..tokenizer_files import save_tokenizer as save_tokenizer_files
from .folder import TOKENIZER_DIR, find_run, read_run_config


def accepts(fn, name: str) -> bool:
    """Whether ``fn`` names the parameter ``name`` (a **kwargs catch-all does not count: it may forward
    to a config that rejects it)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def trains_vocabulary(backbone, opts: dict[str, Any]) -> bool:
    """Whether the backbone builds its tokenizer from the data (so a run's answers need the run's tokenizer)."""
    return backbone.builder is not None and accepts(backbone.builder, "texts") and not opts.get("pretrained")


def build_model(backbone, opts: dict[str, Any], *, texts: list[str] | None = None, tokenizer_dir: Path | None = None):
    """The base model of a run, built the same way by ``train`` and every command that reads the run.

    The random init is seeded with the run's seed, so the frozen weights of an adapter's base model
    can be rebuilt exactly; a tokenizer saved by the run is read back by the backbone's registered
    tokenizer loader (else one is trained on ``texts``).
    """
    options = dict(opts.get("backbone_options") or {})
    seed_everything(int(opts.get("seed", 0)))
    if opts.get("pretrained"):  # a checkpoint folder brings its own weights and vocabulary
        return backbone.from_pretrained(opts["pretrained"], **options)
    if tokenizer_dir is not None and tokenizer_dir.is_dir() and backbone.tokenizer_loader is not None \
            and any(tokenizer_dir.iterdir()):
        options.setdefault("tokenizer", load_tokenizer(backbone, tokenizer_dir))
    elif texts is not None and backbone.builder is not None and accepts(backbone.builder, "texts"):
        options.setdefault("texts", texts)
    return backbone.build(**options)


def save_tokenizer(model, folder: Path, backbone) -> None:
    """Keep the model's tokenizer (e.g. a WordPiece vocabulary trained on the data) beside the adapter."""
    if backbone.tokenizer_loader is not None:  # only what the backbone can read back is worth keeping
        save_tokenizer_files(getattr(model, "tokenizer", None), folder, backbone.name)


def run_options(adapter: str | os.PathLike) -> tuple[Path | None, dict[str, Any]]:
    """The run folder an adapter belongs to and its checked options ((None, {}) for an adapter on its own)."""
    run_dir = find_run(Path(adapter))
    return run_dir, (read_run_config(run_dir) if run_dir is not None else {})


class Adapted(NamedTuple):
    """What ``load_adapted`` returns: ``task`` (the task plugin), ``model`` (the task model to ask:
    ``model.answer(image, question)``), ``options`` (the run's options) and ``manifest`` (adapter.json).
    Unpacks as a 4-tuple."""

    task: Any
    model: Any
    options: dict
    manifest: dict


def load_adapted(adapter, *, registry=None, device: str | torch.device = "auto", base_dtype: str | None = None,
                 quantize: str | None = None, task: str | None = None, texts: list[str] | None = None):
    """``Adapted(task, model, options, manifest)`` for the adapter folder ``adapter``, on the base model its
    run trained (see the module doc), moved to ``device`` and in eval mode.

    ``base_dtype`` / ``quantize``: override the run's (e.g. ``quantize="none"`` for an adapter trained on a
    4-bit base); ``task``: must be the run's task when the run names one; ``texts``: what a backbone that
    trains its vocabulary trains it on when the adapter has no run folder."""
    registry = registry or default_registry()
    adapter = Path(adapter)
    manifest = read_manifest(adapter)
    run_dir, opts = run_options(adapter)
    backbone = registry.backbone(manifest["backbone"])
    run_task = opts.get("task")
    if task is not None and run_task is not None and task != run_task:
        raise ConfigError(f"the adapter {str(adapter)!r} was trained for the task {run_task!r}; it cannot answer "
                          f"--task {task!r} (train an adapter for {task!r})")
    task_obj = registry.get("task", task or run_task or "vqa")
    tokenizer_dir = run_dir / TOKENIZER_DIR if run_dir else None
    has_tokenizer = tokenizer_dir is not None and tokenizer_dir.is_dir() and any(tokenizer_dir.iterdir())
    if trains_vocabulary(backbone, opts) and not has_tokenizer and texts is None:
        raise ConfigError(f"the adapter {str(adapter)!r} has no run folder with the tokenizer its training built "
                          f"(expected {TOKENIZER_DIR}/ beside train_config.json above the adapter); backbone "
                          f"{backbone.name!r} trains its vocabulary on the data, so answers need that tokenizer")
    model = build_model(backbone, opts, texts=texts, tokenizer_dir=tokenizer_dir)
    pm = load_adapter(model, adapter, backbone=backbone, registry=registry)
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    q = quantize or opts.get("quantize") or "none"
    prepare(pm, base_dtype=base_dtype or opts.get("base_dtype") or "auto", quantize=q,
            quantize_components=opts.get("quantize_components"), device=dev if q != "none" else None)
    # answers are generated as long as the run's (derived from its training answers), unless a call says otherwise
    pm.generation_length = opts.get("max_new_tokens")
    task_model = task_obj.wrap(pm)
    task_model.to(dev)
    task_model.eval()
    return Adapted(task_obj, task_model, opts, manifest)
