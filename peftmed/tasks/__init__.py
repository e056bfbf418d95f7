"""Tasks: what a model is trained and scored on (Med-VQA, report generation, a plugin's own).

A task is registered through the ``register_tasks`` hook as a :class:`Task`: it names the records it
reads (a dataset declares its task), turns them into a torch Dataset and batches, says which text a
backbone may train its tokenizer on, wraps the adapted model in the task's protocol, generates and
scores predictions through a registered metric, and describes the columns the bench shows. ``peftmed
train``, ``eval`` and ``bench`` look the task up by name and never branch on it; the built-in ``vqa``
(``peftmed.tasks.vqa``) and ``report`` (``peftmed.report.plugin``) tasks go through the same hook.

    task = registry.get("task", "vqa")
    result = evaluate(task, model, test_records, registry=registry, batch_size=16, num_beams=3)
    print(result.summary()); result.write("runs/x")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.dataset import image_to_tensor
from ..data.images import open_image
from ..errors import ConfigError, PeftmedError, UnknownNameError
from ..files import write_json_atomic
from ..plugins import default_registry
from ..runtime import autocast_for


@dataclass(frozen=True)
class ScoreColumn:
    """One score a task reports, as the bench's tables show it."""

    key: str  # key in the metric's scores
    header: str  # column header
    fmt: str = ".3f"


class Task:
    """A task: what a model is trained and scored on. Built-in tasks subclass it (``peftmed.tasks.vqa.VQATask``,
    ``peftmed.report.task.ReportTask``); a plugin may too, or pass any attribute or method as a keyword
    (``Task(name="mine", dataset=fn, ...)``: a callable given there stands in for the method of that name).

    Attributes:
      name: what ``--task`` and a dataset's ``task`` name.
      description: one line for listings.
      noun: what a record is, for messages ("questions", "reports").
      metric: the registered metric that scores predictions (``registry.get("metric", metric)``).
      columns: the scores the bench tables show; ``primary`` is the one plots and winners use.
      primary: key of the main score (higher is better).
      max_new_tokens: default generation length when none is given.
      needs_question: whether a sample is an image and a question (VQA) or an image alone (a report).
      output: what the generated text is called in files and messages ("answer", "report").
      baseline_name: key of the baseline's scores in metrics.json; ``baseline_label`` prints beside them.
      capability: what a backbone must list in its ``tasks`` to serve it (the name by default).
      default_dataset: the dataset the bench uses when none is given.
      binary: whether ``record_scores`` are 0/1 (right/wrong): the bench then pairs with McNemar's test.
      bench_steps, bench_batch_size, bench_eval_samples: the bench's default budget for the task on a
        CPU (steps x batch per recipe, test records scored; None: the whole test split).
      record_scores: None, or a method ``record_scores(predictions, records) -> {record id: score}``: each
        record's share of the primary score (their mean is it), for intervals and paired tests.
      targets: None, or a method ``targets(records) -> list[str]``: the texts the model learns to generate (VQA:
        the answers), from which the generation length is derived (:func:`answer_lengths`).

    Methods (a subclass implements the first five):
      dataset(records, image_size, cache_dir=None) -> a torch Dataset of model-ready items;
      collate(items) -> the batch ``compute_loss`` / ``generate`` take;
      texts(train_records) -> what a backbone trains its tokenizer on;
      baseline(train_records, test_records) -> {record id: prediction} of the task's trivial baseline;
      summary(scores) -> one line;
      write_predictions(path, predictions, records): one row per record (default: id, prediction);
      wrap(model) -> the model that serves the task (default: the model itself);
      generate(model, batch, max_new_tokens, num_beams) -> texts (default: ``model.generate``).
    """

    name: str = ""
    description: str = ""
    noun: str = "items"
    metric: str = ""
    columns: tuple[ScoreColumn, ...] = ()
    primary: str = ""
    max_new_tokens: int = 10
    needs_question: bool = True
    output: str = "answer"
    baseline_name: str = "baseline"
    baseline_label: str = "baseline:"
    capability: str = ""
    default_dataset: str | None = None
    binary: bool = False
    bench_steps: int = 40
    bench_batch_size: int = 8
    bench_eval_samples: int | None = None
    record_scores: Callable[..., dict[str, float]] | None = None
    targets: Callable[[Sequence], list[str]] | None = None

    def __init__(self, **fields: Any):
        for key, value in fields.items():
            if not hasattr(type(self), key) or key.startswith("_"):
                raise PeftmedError(f"task {fields.get('name', self.name)!r}: {key!r} is not a task attribute or method")
            setattr(self, key, value)
        if not self.name:
            raise PeftmedError(f"{type(self).__name__}: a task needs a name")
        if not self.capability:
            self.capability = self.name
        if self.primary not in {c.key for c in self.columns}:
            raise PeftmedError(f"task {self.name!r}: primary score {self.primary!r} is not one of its columns")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def dataset(self, records: Sequence, image_size: int, cache_dir=None):
        raise NotImplementedError(f"task {self.name!r} has no dataset()")

    def collate(self, items: Sequence[dict]) -> dict:
        raise NotImplementedError(f"task {self.name!r} has no collate()")

    def texts(self, records: Sequence) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} has no texts()")

    def baseline(self, train_records: Sequence, test_records: Sequence) -> dict[str, str]:
        raise NotImplementedError(f"task {self.name!r} has no baseline()")

    def summary(self, scores: dict) -> str:
        return "  ".join(f"{c.header} {scores[c.key]:{c.fmt}}" for c in self.columns if scores.get(c.key) is not None)

    def write_predictions(self, path, predictions: dict, records: Sequence):
        return write_json_atomic(path, [{"id": k, "prediction": v} for k, v in predictions.items()])

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def generate(self, model: nn.Module, batch: dict, max_new_tokens: int, num_beams: int) -> list[str]:
        return model.generate(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)


@dataclass
class EvalResult:
    """Predictions (record id -> text) and the task's scores of them."""

    predictions: dict[str, str]
    scores: dict[str, Any]
    records: list
    task: Task | None = field(default=None, repr=False)

    def write(self, folder: str | Path, prefix: str = "") -> tuple[Path, Path]:
        """Write ``<prefix>predictions.json`` and ``<prefix>metrics.json`` into ``folder``."""
        folder = Path(folder)
        preds = folder / f"{prefix}predictions.json"
        self.task.write_predictions(preds, self.predictions, self.records)
        metrics = write_json_atomic(folder / f"{prefix}metrics.json", self.scores)
        return preds, metrics

    def summary(self) -> str:
        return self.task.summary(self.scores)


def resolve_task(registry, name: str | None, dataset_spec) -> Task:
    """The run's task: as given, else the dataset's; a dataset of another task is refused, naming the
    datasets that serve the task asked for."""
    wanted = name or getattr(dataset_spec, "task", "vqa")
    task = registry.get("task", wanted)
    have = getattr(dataset_spec, "task", "vqa")
    if have != task.name:
        fits = sorted(n for n, d in registry.all("dataset").items() if getattr(d, "task", "vqa") == task.name)
        raise ConfigError(f"--task {task.name} needs a {task.name} dataset, but {dataset_spec.name!r} is a {have} "
                          f"dataset ({task.name} datasets: {', '.join(fits) or 'none registered'})")
    return task


def check_backbone(task: Task, backbone) -> None:
    """A backbone that does not list the task's capability is refused before anything is built."""
    tasks = tuple(getattr(backbone, "tasks", ()) or ())
    if tasks and task.capability not in tasks:
        raise ConfigError(f"backbone {backbone.name!r} serves {', '.join(tasks)}, not the {task.name} task "
                          f"(it would need the {task.capability!r} capability)")


def build_options(task: Task, backbone, options: dict | None = None) -> dict:
    """Builder options for ``backbone`` serving ``task``: the backbone's own defaults for the task
    (``Backbone.task_options``), then the user's."""
    defaults = dict((getattr(backbone, "task_options", {}) or {}).get(task.name, {}))
    return {**defaults, **dict(options or {})}


def generation_room(model: nn.Module) -> int | None:
    """The longest text ``model`` can generate, in tokens, as its ``text_limits`` says (its position
    embeddings), or None when it does not say."""
    for module in model.modules():
        text_limits = getattr(type(module), "text_limits", None)
        if callable(text_limits):
            room = text_limits(module, "").room
            return None if room is None else int(room)
    return None


def _method(model: nn.Module, name: str):
    """``name`` of the first module (the model or one it wraps) whose class defines it, bound to that module."""
    for module in model.modules():
        fn = getattr(type(module), name, None)
        if callable(fn):
            return fn.__get__(module)
    return None


@dataclass
class AnswerLengths:
    """How long the answers of a run are in the model's tokens, and what that means for generation.

    ``longest``: the longest training answer; ``max_new_tokens``: the generation length used (derived from
    ``longest`` unless given); ``training_cap``: the answer length the loss sees (raised to fit ``longest``
    unless given); ``reachable`` of ``total`` test answers fit in ``max_new_tokens`` (``unreachable``: a few
    that do not)."""

    longest: int
    max_new_tokens: int
    training_cap: int | None
    reachable: int
    total: int
    unreachable: list[str] = field(default_factory=list)
    derived: bool = True

    def summary(self) -> str:
        text = (f"answers: the longest training answer is {self.longest} tokens; generating up to "
                f"{self.max_new_tokens}{' (derived from the data)' if self.derived else ''}; {self.reachable} of "
                f"{self.total} test answers are reachable")
        if self.unreachable:
            text += f" (not: {', '.join(repr(a) for a in self.unreachable[:3])}{' ...' if len(self.unreachable) > 3 else ''})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ANSWER_MARGIN = 2  # generation room beyond the longest training answer (a test answer may be a little longer)


def answer_lengths(model: nn.Module, train_answers: Sequence[str], test_answers: Sequence[str], *,
                   max_new_tokens: int | None = None, fix_training_cap: bool = True) -> AnswerLengths | None:
    """Derive the generation length from the data (the longest training answer in the model's tokens plus a
    margin) unless ``max_new_tokens`` is given, raise the model's training answer length to fit that answer
    (unless ``fix_training_cap`` is False), and count the test answers generation can reach. None for a model
    that cannot count its answer tokens (it has no ``answer_tokens(text)``)."""
    count = _method(model, "answer_tokens")
    if count is None or not train_answers:
        return None
    longest = max(count(str(a)) for a in train_answers)
    room = generation_room(model)
    derived = max_new_tokens is None
    if derived:
        max_new_tokens = longest + ANSWER_MARGIN
        if room is not None:
            max_new_tokens = min(max_new_tokens, room)
    cap = None
    text_limits = _method(model, "text_limits")
    if text_limits is not None:
        limits = text_limits("")
        current = getattr(limits.owner, limits.attr, None)
        if isinstance(current, int):
            cap = current
            wanted = longest + limits.specials
            if limits.room is not None:
                wanted = min(wanted, limits.room + limits.specials)
            if fix_training_cap and wanted > current:
                setattr(limits.owner, limits.attr, wanted)
                cap = wanted
    lengths = [(a, count(str(a))) for a in test_answers]
    unreachable = [a for a, n in lengths if n > max_new_tokens]
    return AnswerLengths(longest, int(max_new_tokens), cap, len(lengths) - len(unreachable), len(lengths),
                         [str(a) for a in unreachable[:10]], derived)


def check_generation_length(model: nn.Module, max_new_tokens: int) -> None:
    """Refuse a generation length the model's positions cannot hold (it would index past them)."""
    room = generation_room(model)
    if room is not None and max_new_tokens > room:
        raise ConfigError(f"max_new_tokens {max_new_tokens} is more than this model can generate: its position "
                          f"embeddings hold {room} text tokens; pass --max-new-tokens {room} or less")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, records: Sequence, *, registry=None, batch_size: int = 16,
             num_beams: int = 3, max_new_tokens: int | None = None, image_size: int | None = None,
             limit: int | None = None, progress: bool = False, dataset=None) -> EvalResult:
    """Generate a prediction per record and score them with the task's metric (matched by record id).

    ``limit`` evaluates the first ``limit`` records only (periodic evaluation during training);
    ``dataset`` reuses a dataset built over ``records`` (its image cache) instead of building one.
    """
    from torch.utils.data import DataLoader, Subset

    if registry is None:
        registry = default_registry()
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    for key, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    check_generation_length(model, max_new_tokens)
    records = list(records)
    if not records:
        raise ConfigError("nothing to evaluate: the record list is empty")
    if dataset is None:
        size = image_size or getattr(model, "image_size", None)
        if size is None:
            raise ConfigError(f"{type(model).__name__} has no image_size; pass image_size=")
        dataset = task.dataset(records, int(size))
    n = len(records) if limit is None else min(limit, len(records))
    records = records[:n]
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, collate_fn=task.collate)
    device = _device(model)
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="eval", unit=task.noun.rstrip("s") or "item", dynamic_ncols=True)
    try:
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            with autocast_for(model, device):  # a bf16/fp16 base answers in its dtype
                texts = task.generate(model, batch, max_new_tokens, num_beams)
            if len(texts) != len(batch["qids"]):
                raise ConfigError(f"{type(model).__name__} returned {len(texts)} predictions for a batch of "
                                  f"{len(batch['qids'])} {task.noun}")
            predictions.update(zip(batch["qids"], texts))
            if bar is not None:
                bar.update(len(texts))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return EvalResult(predictions, score(task, predictions, records, registry), records, task)


def image_batch(images: Sequence, size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size) from image paths, PIL images or uint8 (3, H, W) tensors, prepared as the
    training data was (RGB, bicubic resize); a missing or unreadable file is an error naming it."""
    from PIL import Image  # deferred: listings and help never read an image


    out = []
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ConfigError(f"image {i}: a tensor image must be uint8 (3, H, W), got {image.dtype} "
                                  f"{tuple(image.shape)}")
            image = Image.fromarray(image.expand(3, -1, -1).permute(1, 2, 0).numpy())
        elif not isinstance(image, Image.Image):
            image = open_image(image, what=f"image {i}")
        out.append(image_to_tensor(image, size))
    return torch.stack(out)


def truncated_questions(model: nn.Module) -> int:
    """How many questions the model has cut to its length limit so far (its own counter; ``vars``: a wrapper
    forwarding attribute reads would count it twice)."""
    return sum(int(vars(m).get("truncated_questions", 0) or 0) for m in model.modules())


@torch.no_grad()
def answer(task: Task, model: nn.Module, images: Sequence, questions: Sequence[str] | None = None, *,
           batch_size: int = 16, num_beams: int = 3, max_new_tokens: int | None = None) -> tuple[list[str], int]:
    """The task model's outputs (answers, reports: ``task.output``) for ``images`` (and ``questions`` when the
    task asks them), in order, and how many questions were longer than the model's limit (cut to it; the
    answer is to the cut question). The generation length: ``max_new_tokens``, else the adapted model's
    ``generation_length`` (a run's, derived from its training answers), else the task's default."""
    if questions is None:
        questions = [""] * len(images)
    if len(questions) != len(images):
        raise ConfigError(f"{len(images)} images but {len(questions)} questions")
    if task.needs_question:
        empty = [i for i, q in enumerate(questions) if not str(q).strip()]
        if empty:
            raise ConfigError(f"question {empty[0]} is empty; the task {task.name!r} needs a question per image")
    for key, value in (("batch_size", batch_size), ("num_beams", num_beams)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    size = int(getattr(model, "image_size"))
    device = _device(model)
    lengths = [getattr(m, "generation_length", None) for m in model.modules()]
    tokens = max_new_tokens or next((n for n in lengths if n), None) or task.max_new_tokens
    check_generation_length(model, tokens)
    before = truncated_questions(model)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            pixels = image_batch(images[chunk], size).to(device)
            qs = [str(q) for q in questions[chunk]]
            batch = {"images": pixels, "questions": qs, "qids": [str(i) for i in range(start, start + len(qs))]}
            with autocast_for(model, device):
                out += task.generate(model, batch, tokens, num_beams)
    finally:
        model.train(was_training)
    return out, truncated_questions(model) - before


def score(task: Task, predictions: dict, records: Sequence, registry=None) -> dict[str, Any]:
    """The task's metric (looked up by name in the registry) over ``predictions``."""
    if registry is None:
        registry = default_registry()
    try:
        metric = registry.get("metric", task.metric)
    except UnknownNameError as exc:
        raise PeftmedError(f"task {task.name!r} scores with metric {task.metric!r}, which is not registered") from exc
    return metric.compute(predictions, list(records))


def baseline_scores(task: Task, train_records: Sequence, test_records: Sequence, registry=None) -> dict[str, Any]:
    """Scores of the task's trivial baseline on ``test_records``."""
    return score(task, task.baseline(train_records, test_records), test_records, registry)


__all__ = ["AnswerLengths", "EvalResult", "ScoreColumn", "Task", "answer", "answer_lengths", "baseline_scores",
           "build_options", "check_backbone", "check_generation_length", "evaluate", "generation_room", "image_batch",
           "resolve_task", "score", "truncated_questions"]
