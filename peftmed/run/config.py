"""A run's options: what to train (``RUN_OPTIONS``: backbone, recipe, dataset, output...) and how
(:class:`TrainConfig`: budget, optimiser, schedule, precision...), and experiment files (YAML, TOML or
JSON) whose keys are CLI flags.

Every option is also a ``peftmed train`` flag (``batch_size`` -> ``--batch-size``) and a key of an
experiment file; flags given on the command line override the file. ``read_config_file`` reads a file
into a flat dict, refusing unknown keys by name; ``check_options`` validates a run's options as they are
read back from its folder (``train_config.json``), naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownNameError
from ..options import parse_bool, read_structured_file

PRECISIONS = ("auto", "bf16", "fp32")
BASE_DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("none", "nf4")
STRATEGIES = ("auto", "ddp", "fsdp")


# --report-to targets and the package each needs (checked when the config is made, before any work)
REPORT_TARGETS = ("tensorboard", "wandb", "mlflow")
REPORT_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _installed(target: str) -> bool:
    return importlib.util.find_spec(REPORT_MODULES[target]) is not None


def parse_targets(value) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` / ``"all"`` / ``"none"`` -> the targets; unknown or missing ones are named."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(t for t in REPORT_TARGETS if _installed(t))
    for name in names:
        if name not in REPORT_TARGETS:
            raise ConfigError(f"--report-to: unknown target {name!r}; expected a comma list of "
                              f"{', '.join(REPORT_TARGETS)} (or all, none)")
        if not _installed(name):
            raise ConfigError(f"--report-to {name}: the {REPORT_MODULES[name]} package is not installed "
                              f"(pip install {REPORT_MODULES[name]})")
    return tuple(dict.fromkeys(names))


# Options of a run beyond TrainConfig: (type, default, help). Dict-valued ones take KEY=VALUE.
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
# What decides the frozen base model of a run: fixed for its whole life (a resume may not change them)
BASE_MODEL_OPTIONS = ("backbone", "backbone_options", "pretrained", "seed")


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field whose help text is the flag's ``--help`` (the field's comment)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """How to train: budget, optimiser, schedule, evaluation, checkpoints, precision, scale."""

    # ---- budget (the first one reached stops training) ----
    steps: int | None = _f(None, "optimizer steps to train (also the cosine horizon)")
    epochs: float | None = _f(None, "epochs to train (the cosine horizon when --steps is not given)")
    time_budget: float | None = _f(None, "stop after this many seconds of training (checkpoint and evaluate "
                                         "after); with no --steps/--epochs the lr stays flat after warm-up")
    # ---- batch ----
    batch_size: int = _f(8, "samples per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step (global batch = batch-size x grad-accum x "
                            "processes)")
    # ---- optimiser: AdamW; biases and 1-d tensors (norms, IA3 vectors) get no weight decay ----
    lr: float = _f(1e-4, "peak learning rate (a recipe call's lr= overrides it for its component)")
    method_lr: bool = _f(False, "give each method its usual learning rate (its default_lr: LoRA 1e-3, full 1e-4 ...) "
                                "where the recipe sets none, instead of --lr")
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices (not on biases and norm weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    # ---- schedule: linear warm-up, then cosine to min_lr_ratio x lr ----
    warmup_ratio: float = _f(0.05, "warm-up as a fraction of the horizon")
    warmup_steps: int | None = _f(None, "warm-up steps (overrides --warmup-ratio)")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of --lr")
    # ---- reproducibility ----
    seed: int = _f(0, "seed of torch, numpy, python and the data order")
    # ---- evaluation ----
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end)")
    eval_samples: int | None = _f(None, "evaluate on at most N records during training (all at the end)")
    eval_batch_size: int | None = _f(None, "batch size of evaluation (default: --batch-size)")
    num_beams: int = _f(3, "beams of answer generation")
    max_new_tokens: int | None = _f(None, "longest generated text, in tokens (default: derived from the data: the "
                                          "longest training answer in the model's tokens + 2; reports: 100)")
    # ---- checkpoints and logging ----
    save_every: int = _f(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = _f(1, "how many checkpoints to keep (the newest)")
    log_every: int = _f(10, "log the loss every N optimizer steps")
    progress: bool = _f(True, "show a progress bar (loss, lr, samples/s, ETA)")
    report_to: str | None = _f(None, "send the curves (loss, lr per group, gradient norm, samples/s, peak memory, "
                                     "evaluations) and the hyperparameters to tensorboard, wandb and/or mlflow "
                                     "(comma list; all: every one installed); written under OUTPUT/logs/")
    run_name: str | None = _f(None, "the run's name in --report-to targets (default: the output folder's name)")
    # ---- device, precision and scale ----
    device: str = _f("auto", "cpu, cuda, cuda:1... (auto: cuda when available)")
    precision: str = _f("auto", "bf16 autocast or fp32 (auto: bf16 on a GPU that supports it)",
                        choices=PRECISIONS)
    strategy: str = _f("auto", "under torchrun: ddp, or fsdp (shards a large model; auto: ddp)",
                       choices=STRATEGIES)
    num_workers: int = _f(0, "data-loading worker processes")
    # ---- memory (real sizes on one GPU) ----
    base_dtype: str = _f("auto", "dtype of the frozen base weights: bf16 or fp16 halve them, trainable tensors and "
                                 "optimizer states stay fp32, training runs under autocast in that dtype (auto: the "
                                 "checkpoint's own dtype, fp32 for a built model)", choices=BASE_DTYPE_CHOICES)
    grad_checkpoint: str | None = _f(None, "recompute the activations of these components' layers in the backward "
                                           "pass (comma list, e.g. vision,llm, or all): far less activation memory "
                                           "for about one more forward pass")
    quantize: str = _f("none", "nf4: hold the frozen linear weights of --quantize-components in 4 bits (QLoRA; "
                               "needs bitsandbytes)", choices=QUANTIZE_CHOICES)
    quantize_components: str | None = _f(None, "components --quantize applies to (comma list; default: llm)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and the valid range."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in kinds:
                continue
            base = [k for k in kinds if k is not type(None)][0]
            ok = isinstance(value, bool) if base is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
                isinstance(value, base) and not isinstance(value, bool) if base is int else isinstance(value, base))
            if not ok:
                want = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[base]
                raise ConfigError(f"{f.name} must be {want}{' or none' if type(None) in kinds else ''}, "
                                  f"got {f.name}={value!r}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "num_beams": self.num_beams,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        for key in ("steps", "eval_samples", "eval_batch_size", "max_new_tokens"):
            if getattr(self, key) is not None:
                positive[key] = getattr(self, key)
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {key}={value!r}")
        for key in ("epochs", "time_budget"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a positive number, got {key}={value!r}")
        for key in ("eval_every", "save_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {key}={getattr(self, key)!r}")
        if warmup := self.warmup_steps:
            if warmup < 0:
                raise ConfigError(f"warmup_steps must be >= 0, got warmup_steps={warmup}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got warmup_ratio={self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got min_lr_ratio={self.min_lr_ratio}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got lr={self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay} and {self.max_grad_norm}"
            )
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {key}={getattr(self, key)}")
        for key, allowed in (("precision", PRECISIONS), ("strategy", STRATEGIES), ("base_dtype", BASE_DTYPE_CHOICES),
                             ("quantize", QUANTIZE_CHOICES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {key}={getattr(self, key)!r}")
        if self.precision == "fp32" and self.base_dtype in ("bf16", "fp16"):
            raise ConfigError(f"--precision fp32 contradicts --base-dtype {self.base_dtype} (a {self.base_dtype} base "
                              f"computes under {self.base_dtype} autocast); drop one of them")
        if self.quantize_components and self.quantize == "none":
            raise ConfigError(f"--quantize-components {self.quantize_components} needs --quantize nf4")
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise ConfigError(f"adam_eps must be a positive number (AdamW divides by sqrt(v) + eps: 0 turns a zero "
                              f"gradient into NaN), got adam_eps={self.adam_eps}")
        if not (math.isfinite(self.max_grad_norm) and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay and max_grad_norm must be finite, got {self.weight_decay} and "
                              f"{self.max_grad_norm}")
        if self.report_to is not None:
            parse_targets(self.report_to)
        if self.steps is None and self.epochs is None and self.time_budget is None:
            raise ConfigError("no training budget: give steps, epochs or time_budget (e.g. --steps 500)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        names = field_names(cls)
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UnknownNameError("training option", unknown[0], names)
        return cls(**{k: coerce(cls, k, v) for k, v in data.items()})


def field_names(cls: type = TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def field_type(cls: type, name: str) -> type:
    """The base type of a field (``int | None`` -> int); dataclass annotations are strings here."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def coerce(cls: type, name: str, value: Any) -> Any:
    """A file value converted to the field's type; '--flag false'-style strings become booleans."""
    if value is None:
        return None
    kind = field_type(cls, name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        try:
            return parse_bool(value)
        except ConfigError:
            raise ConfigError(f"{name} expects true or false, got {value!r}") from None
    if kind in (int, float, str):
        if isinstance(value, (dict, list, tuple, set)) or (kind is not str and isinstance(value, bool)):
            raise ConfigError(f"{name} expects {kind.__name__}, got {value!r}")
        if kind is int and isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f"{name} expects an integer, got {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} expects {kind.__name__}, got {value!r}") from None
    return value


def read_config_file(path: str | Path, known: Iterable[str], mappings: Iterable[str] = ()) -> dict[str, Any]:
    """Read an experiment file (.yaml/.yml, .toml or .json) into a flat dict of known keys.

    Keys may be written with dashes or underscores (``batch-size`` or ``batch_size``); a nested
    table/mapping is flattened (``train: {lr: 1e-4}`` -> ``lr``) so files can group options, except
    the keys in ``mappings``, whose values are mappings themselves (e.g. ``data_options``).
    """
    path = Path(path)
    data = read_structured_file(path, "config file")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    known = set(known)
    flat: dict[str, Any] = {}
    for key, value in _flatten(data, {m.replace("-", "_") for m in mappings}):
        name = key.replace("-", "_")
        if name not in known:
            raise UnknownNameError(f"option in {path.name}", key, sorted(known))
        flat[name] = value
    return flat


def _flatten(data: Mapping, keep: set[str]):
    for key, value in data.items():
        if isinstance(value, Mapping) and str(key).replace("-", "_") not in keep:
            yield from _flatten(value, keep)
        else:
            yield str(key), value


def default_options() -> dict[str, Any]:
    """Every run option and TrainConfig field at its default."""
    opts: dict[str, Any] = {k: (dict(d) if isinstance(d, dict) else d) for k, (_, d, _) in RUN_OPTIONS.items()}
    opts.update({f.name: f.default for f in dataclasses.fields(TrainConfig)})
    return opts


def check_options(data: Any, where: str) -> dict[str, Any]:
    """A run's options as read back from ``where`` (its ``train_config.json``), each checked against its
    type like a manifest: the error names the file and the field. Unknown keys are refused (a typo would
    otherwise be ignored and the run rebuilt differently)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must hold a JSON object of option: value, got {type(data).__name__}")
    known = set(RUN_OPTIONS) | set(field_names(TrainConfig))
    out = default_options()
    for key, value in data.items():
        if key not in known:
            raise UnknownNameError(f"option in {where}", str(key), sorted(known))
        if key in RUN_OPTIONS:
            kind = RUN_OPTIONS[key][0]
            if value is None and RUN_OPTIONS[key][1] is None:
                out[key] = None
            elif kind is dict:
                if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                    raise ConfigError(f"{where}: {key} must be a mapping of option: value, got {value!r}")
                out[key] = dict(value)
            elif kind is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
                out[key] = value
            elif not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
            else:
                out[key] = value
        else:
            try:
                out[key] = coerce(TrainConfig, key, value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            kind = field_type(TrainConfig, key)
            if value is not None and kind in (int, float) and (isinstance(value, (str, bool))):
                raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    try:
        # --report-to is not checked here: a run logged to wandb is still evaluated where wandb is not installed
        TrainConfig.from_dict({**{k: out[k] for k in field_names(TrainConfig)}, "report_to": None})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return out
