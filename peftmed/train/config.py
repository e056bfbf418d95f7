"""The training configuration, and experiment files (YAML, TOML or JSON) whose keys are CLI flags.

Every field of :class:`TrainConfig` is also a ``peftmed train`` flag (``batch_size`` ->
``--batch-size``) and a key of an experiment file; flags given on the command line override the
file. ``read_config_file`` reads a file into a flat dict, refusing unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
BASE_DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("none", "nf4")
STRATEGIES = ("auto", "ddp", "fsdp")


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
    max_new_tokens: int | None = _f(None, "longest generated text, in tokens (default: the task's: 10 for "
                                          "answers, 100 for reports)")
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
        if self.report_to is not None:
            from .reporting import parse_targets

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
            from ..errors import UnknownNameError

            raise UnknownNameError("training option", unknown[0], names)
        return cls(**{k: coerce(cls, k, v) for k, v in data.items()})


def field_names(cls: type = TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def field_type(cls: type, name: str) -> type:
    """The base type of a field (``int | None`` -> int); dataclass annotations are strings here."""
    import typing

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
        from ..cli import str2bool

        try:
            return str2bool(value)
        except Exception:
            raise ConfigError(f"{name} expects true or false, got {value!r}") from None
    if kind in (int, float, str):
        if kind is int and isinstance(value, float) and not value.is_integer():
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
    from ..options import read_structured_file

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
            from ..errors import UnknownNameError

            raise UnknownNameError(f"option in {path.name}", key, sorted(known))
        flat[name] = value
    return flat


def _flatten(data: Mapping, keep: set[str]):
    for key, value in data.items():
        if isinstance(value, Mapping) and str(key).replace("-", "_") not in keep:
            yield from _flatten(value, keep)
        else:
            yield str(key), value
