"""The trainer: AdamW + cosine schedule with warm-up, accumulation, clipping, bf16 autocast on GPU,
periodic evaluation and atomic, exactly-resumable checkpoints; the same code under torchrun.

    trainer = Trainer(pm, VQADataset(train_records, pm.image_size), TrainConfig(steps=500, lr=1e-4),
                      output_dir="runs/lora", eval_fn=lambda m, limit: evaluate(m, test_records).scores)
    result = trainer.train()            # or train(resume=True) to continue the latest checkpoint

Exact resume: the data order of epoch e is a permutation drawn from a generator seeded with
(seed, e); a checkpoint stores the position in it (epoch and the number of samples of that epoch
already trained on), the optimizer and scheduler states and every RNG state, so a resumed run
computes the same losses as one never interrupted. A resume with another global batch (batch size,
accumulation or number of processes) continues from the same sample of the same epoch; a changed
dataset size continues at the same sample count of the new epoch order (both are logged).

Loss normalisation: a model with ``loss_terms(batch) -> (sum of token losses, number of target
tokens)`` is trained on the sum over every micro-batch and process divided by the global number of
target tokens, so 1 process x batch 8, 2 processes x batch 4 and batch 4 x 2 accumulation steps give
the same gradient (up to summation order). A model with only ``compute_loss`` is averaged per
micro-batch.

Signals: SIGINT (Ctrl-C) and SIGTERM (what schedulers send) stop training at the next step boundary
with a checkpoint written (``TrainingInterrupted`` says where and how to resume); a second signal
aborts at once.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import collate as default_collate
from ..errors import ConfigError, PeftmedError
from ..memory import base_dtype_of
from ..model import find_peft_model
from ..run.config import TrainConfig
from ..runtime import adamw, seed_everything
from . import checkpoint as ckpt
from . import distributed
from .loggers import Loggers

log = logging.getLogger("peftmed.train")


class NonFiniteLossError(PeftmedError, RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before the update."""


class TrainingInterrupted(PeftmedError, RuntimeError):
    """SIGINT or SIGTERM stopped training at a step boundary; a checkpoint was written when it could be.

    ``exit_code`` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report it.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        where = (f"checkpoint written: {checkpoint}; continue it with the same command and --resume"
                 if checkpoint is not None else "no output folder, so no checkpoint was written")
        super().__init__(f"training interrupted by {name} after step {step}: {where}")


@dataclass
class TrainResult:
    """What a run did. ``losses[i]`` is the loss of optimizer step i + 1 (resumed runs included)."""

    step: int
    epoch: float
    losses: list[float]
    lrs: list[float]
    evals: list[dict[str, Any]]
    stopped_by: str  # steps | epochs | time
    checkpoint: Path | None
    samples_per_second: float
    train_seconds: float
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step of this process's run
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "losses": self.losses, "lrs": self.lrs,
                "evals": self.evals, "stopped_by": self.stopped_by,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "samples_per_second": self.samples_per_second, "train_seconds": self.train_seconds,
                "step_seconds": self.step_seconds, **self.extra}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Stable name -> trainable parameter, sorted by name (the optimizer's parameter order).

    For a PeftModel (or a task wrapper holding one, e.g. a ReportModel) these are its adapter tensors
    (canonical names, what an adapter file holds); a parameter that requires grad outside the adapter
    would be trained but never saved, so it is refused.
    """
    peft = find_peft_model(model)
    if peft is not None and peft.active_adapter is not None:
        tensors: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for name, p in peft.adapter_tensors().items():
            if id(p) not in seen:
                seen.add(id(p))
                tensors[name] = p
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        if stray:
            raise ConfigError(
                f"parameters {stray[:3]} require grad but are not part of the active adapter, so they "
                f"would be trained and never saved; freeze them or add them to the recipe"
            )
        frozen = [n for n, p in tensors.items() if not p.requires_grad]
        if frozen:
            raise ConfigError(f"adapter tensors {frozen[:3]} do not require grad; is the adapter active?")
    else:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ConfigError("the model has no trainable parameter (nothing requires grad); apply a recipe first")
    return dict(sorted(tensors.items()))


def cosine_with_warmup(warmup: int, horizon: int | None, min_ratio: float) -> Callable[[int], float]:
    """lr factor of optimizer step ``s`` (0-based): linear warm-up to 1, cosine down to ``min_ratio``.

    With no horizon (a wall-clock budget alone) the factor stays 1 after warm-up.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if horizon is None:
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, horizon - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Trains ``model`` (anything with ``compute_loss(batch) -> scalar``, usually a PeftModel).

    Args:
      model: the model; only parameters that require grad are optimised and checkpointed.
      train_data: a sequence of samples (e.g. ``peftmed.data.VQADataset``); ``collate_fn`` batches them
        (default ``peftmed.data.collate``).
      config: a TrainConfig.
      output_dir: where checkpoints (``checkpoints/``) and the final adapter (``adapter/``) go; None
        writes nothing.
      eval_fn: ``eval_fn(model, limit) -> dict of scores``, called every ``eval_every`` steps (``limit``
        = ``eval_samples``) on rank 0; the CLI passes ``peftmed.train.evaluate``.
      run_info: JSON-able facts stored in each checkpoint (``backbone``, ``recipe_json``, dataset...).
        A resume with another ``backbone`` or ``recipe_json`` is refused.
      lr_of: ``lr_of(tensor name) -> learning rate`` overriding the rates a PeftModel's recipe gives (a recipe
        call's ``lr=``, else ``config.lr``, or the method's ``default_lr`` with ``config.method_lr``).
    """

    def __init__(self, model: nn.Module, train_data: Sequence, config: TrainConfig, *,
                 output_dir: str | Path | None = None, collate_fn: Callable | None = None,
                 eval_fn: Callable[[nn.Module, int | None], dict] | None = None,
                 run_info: Mapping[str, Any] | None = None, lr_of: Callable[[str], float] | None = None,
                 log_dir: str | Path | None = None):
        if not hasattr(model, "compute_loss"):
            raise ConfigError(f"{type(model).__name__} has no compute_loss(batch); the trainer needs one")
        if collate_fn is None:
            collate_fn = default_collate
        self.model, self.data, self.config = model, train_data, config
        self.collate_fn, self.eval_fn, self.lr_of = collate_fn, eval_fn, lr_of
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.loggers = None
        self.keep_loggers_open = False  # the caller logs a final evaluation, then calls close_loggers()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_info = dict(run_info or {})
        self.run_info.setdefault("backbone", getattr(getattr(model, "backbone", None), "name", None))
        if "recipe_json" not in self.run_info and getattr(model, "active_adapter", None):
            self.run_info["recipe_json"] = model.adapters[model.active_adapter].recipe.to_dict()

    # ---- geometry ----------------------------------------------------------------------------------
    def _geometry(self) -> None:
        c, d = self.config, self.dist
        self.per_rank = c.batch_size * c.grad_accum
        self.global_batch = self.per_rank * d.world_size
        n = len(self.data)
        if n == 0:
            raise ConfigError("the training set is empty")
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {n} samples, fewer than one global batch of {self.global_batch} "
                f"(batch_size {c.batch_size} x grad_accum {c.grad_accum} x {d.world_size} processes); "
                f"lower --batch-size or --grad-accum"
            )
        limits = []
        if c.steps is not None:
            limits.append(c.steps)
        if c.epochs is not None:
            limits.append(max(1, round(c.epochs * self.steps_per_epoch)))
        self.horizon = min(limits) if limits else None
        if c.warmup_steps is not None:
            self.warmup = c.warmup_steps
        else:
            self.warmup = int(round(c.warmup_ratio * self.horizon)) if self.horizon else 0

    def _order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: the same on every rank and in every resumed run."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def _steps_left(self, offset: int) -> int:
        """Whole global batches left in an epoch once ``offset`` of its samples were trained on."""
        return max(0, (len(self.data) - offset) // self.global_batch)

    def _micro_batches(self, epoch: int, offset: int) -> Iterator[list[int]]:
        """This rank's micro-batches (lists of sample indices) of ``epoch``, from its sample ``offset`` on."""
        order = self._order(epoch).tolist()
        bs, lo, gb = self.config.batch_size, self.dist.rank * self.per_rank, self.global_batch
        for b in range(self._steps_left(offset)):
            start = offset + b * gb
            mine = order[start:start + gb][lo:lo + self.per_rank]
            for k in range(self.config.grad_accum):
                yield mine[k * bs:(k + 1) * bs]

    def _loader(self, epoch: int, start: int):
        from torch.utils.data import DataLoader

        # its own generator: a DataLoader iterator otherwise draws its worker seed from the global RNG,
        # and a resumed run creates one more iterator than an uninterrupted one (exactness)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return DataLoader(self.data, batch_sampler=list(self._micro_batches(epoch, start)),
                          collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                          pin_memory=self.dist.device.type == "cuda", generator=g)

    # ---- setup -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        c = self.config
        self.dist = distributed.setup(c.device)
        self._geometry()
        self.model.to(self.dist.device)
        if c.strategy == "fsdp" and self.dist.enabled and c.eval_every:
            raise ConfigError("--eval-every with --strategy fsdp: a sharded model cannot answer on one rank while the "
                              "others wait; evaluate the saved adapter after training (peftmed eval --adapter ...)")
        trainable_parameters(self.model)  # refuses stray trainable tensors before anything is wrapped
        self.wrapped = distributed.wrap(self.model, self.dist, c.strategy)
        self.params = trainable_parameters(self.model)  # after sharding: the sharded tensors, by the same names
        self.optimizer = adamw(self._param_groups(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
                                           eps=c.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.warmup, self.horizon, c.min_lr_ratio))
        self.autocast_dtype = self._autocast_dtype()
        # fp16 has too few exponent bits for small gradients: scale the loss (steps that overflow are skipped)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.autocast_dtype == torch.float16)
        self.state = {"step": 0, "epoch": 0, "sample_in_epoch": 0, "samples": 0, "train_seconds": 0.0,
                      "losses": [], "lrs": [], "evals": []}
        self.step_seconds: list[float] = []
        if self.dist.is_main and self.checkpoint_root is not None:
            ckpt.remove_stale_temporaries(self.checkpoint_root)
        if self.dist.is_main and c.report_to:
            self.loggers = self._open_loggers()

    def _open_loggers(self):
        folder = self.log_dir or (self.output_dir / "logs" if self.output_dir is not None else None)
        if folder is None:
            raise ConfigError("--report-to needs an output folder (or log_dir=) to write the logs in")
        peft = find_peft_model(self.model)
        texts = {}
        if peft is not None and peft.active_adapter is not None:
            texts["trainable"] = str(peft.trainable_report(lr=self.config.lr, weight_decay=self.config.weight_decay,
                                                           method_lr=self.config.method_lr))
            texts["recipe"] = peft.adapters[peft.active_adapter].recipe.to_text()
        hparams = {**{k: v for k, v in self.run_info.items() if k != "recipe_json"}, **texts,
                   **{k: v for k, v in self.config.to_dict().items() if k not in ("progress", "report_to")}}
        hparams.pop("trainable", None)
        name = self.config.run_name or (self.output_dir.name if self.output_dir is not None else "run")
        return Loggers(self.config.report_to, folder, name, hparams, texts)

    def close_loggers(self, scores: Mapping[str, Any] | None = None) -> None:
        """Log ``scores`` (a final evaluation) and close the --report-to targets with the run's final values."""
        if self.loggers is None:
            return
        s = self.state
        numbers = {k: v for k, v in (scores or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.loggers.scalars(s["step"], {f"eval/{k}": v for k, v in numbers.items()})
        final = dict(numbers) or {k: v for k, v in (s["evals"][-1] if s["evals"] else {}).items() if k != "step"}
        final["final_loss"] = s["losses"][-1] if s["losses"] else float("nan")
        self.loggers.close(final)
        self.loggers = None

    def _report_step(self, loss: float, rate: float) -> None:
        values = {"train/loss": loss, "train/grad_norm": getattr(self, "last_grad_norm", None),
                  "train/samples_per_s": rate, "memory/peak_mib": _peak_mib(self.dist.device)}
        for group in self.optimizer.param_groups:
            values.setdefault(f"train/lr/{group.get('name', 'params')}", group["lr"])
        self.loggers.scalars(self.state["step"], values)

    def _param_groups(self) -> list[dict]:
        """AdamW groups, one per (component and method, learning rate, weight decay), named as the trainable
        report names them (``decoder.lora``; ``params`` for a model that is not a PeftModel). Matrices get the
        weight decay; biases and 1-d tensors (norms, IA3 vectors) none. A PeftModel gives each method's tensors
        the rate and decay of its recipe call (``lr=``, ``weight_decay=``), else the run's."""
        c = self.config
        options: dict[str, dict] = {}
        peft = find_peft_model(self.model)
        if peft is not None and peft.active_adapter is not None:
            options = peft.optimizer_options(lr=c.lr, weight_decay=c.weight_decay, method_lr=c.method_lr)
        groups: dict[tuple[str, float, float], list] = {}
        for name, p in self.params.items():
            opt = options.get(name, {})
            lr = self.lr_of(name) if self.lr_of is not None else opt.get("lr", c.lr)
            decays = p.ndim >= 2 and not name.endswith("bias")
            wd = opt.get("weight_decay", c.weight_decay) if decays else 0.0
            groups.setdefault((opt.get("group", "params"), float(lr), float(wd)), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd, "name": label}
                for (label, lr, wd), ps in groups.items()]

    def _autocast_dtype(self) -> torch.dtype | None:
        p, dev = self.config.precision, self.dist.device
        base = base_dtype_of(self.model)
        if base is not None:  # a bf16/fp16 base computes in its dtype, on a CPU as on a GPU
            if p == "fp32":
                raise ConfigError(f"--precision fp32 contradicts a {base} base (--base-dtype); drop one of them")
            return base
        if p == "fp32":
            return None
        on_gpu = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        if p == "bf16" and not on_gpu:
            raise ConfigError(f"precision bf16 needs a GPU with bf16 support; this run is on {dev}. Use "
                              f"--precision fp32 or auto")
        return torch.bfloat16 if on_gpu else None

    # ---- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def _meta(self) -> dict[str, Any]:
        return {**self.run_info, "step": self.state["step"], "epoch": self.state["epoch"],
                "sample_in_epoch": self.state["sample_in_epoch"],
                "batch_in_epoch": self.state["sample_in_epoch"] // self.global_batch, "samples": self.state["samples"],
                "train_seconds": self.state["train_seconds"], "losses": self.state["losses"],
                "lrs": self.state["lrs"], "evals": self.state["evals"], "config": self.config.to_dict(),
                "world_size": self.dist.world_size, "global_batch": self.global_batch,
                "dataset_size": len(self.data), "parameters": {n: list(p.shape) for n, p in self.params.items()}}

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part in gathering)."""
        rngs = self.dist.gather_objects(ckpt.rng_state())
        optim_state = self._optimizer_state()
        tensors = self._full_tensors()  # a collective when sharded: every rank gathers
        path = None
        if self.dist.is_main and self.checkpoint_root is not None:
            path = ckpt.write_checkpoint(
                self.checkpoint_root, self.state["step"], model=find_peft_model(self.model) or self.model,
                trainable=tensors,
                state={"optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rngs,
                       "scaler": self.scaler.state_dict()},  # fp16: the loss scale and its growth tracker
                meta=self._meta(), keep=self.config.keep_checkpoints)
        self.dist.barrier()
        self._last_saved = self.state["step"]
        return path

    def _full_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor whole (gathered from the ranks' shards under FSDP), by name."""
        return {name: distributed.full(p.detach()) for name, p in self.params.items()}

    def _optimizer_state(self) -> dict:
        """AdamW's state keyed by tensor name, whole tensors: independent of the number of processes and of
        the wrapping, so a checkpoint resumes sharded or not, on any number of processes."""
        names = {id(p): n for n, p in self.params.items()}
        raw = self.optimizer.state_dict()
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        state = {order[i]: {k: distributed.full(v) if torch.is_tensor(v) else v for k, v in st.items()}
                 for i, st in sorted(raw["state"].items())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
                  for g in raw["param_groups"]]
        return {"format": "by-name", "state": state, "param_groups": groups}

    def _load_optimizer_state(self, saved: Mapping[str, Any]) -> None:
        if saved.get("format") != "by-name":
            self.optimizer.load_state_dict(saved)  # written before states were kept by name
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in self.params.items()}
        index = {names[id(p)]: i for i, p in enumerate(params)}
        by_name = dict(self.params)
        state = {index[n]: {k: distributed.shard_like(v, by_name[n]) if torch.is_tensor(v) and v.dim() else v
                            for k, v in st.items()}
                 for n, st in saved["state"].items() if n in index}
        if len(saved["param_groups"]) != len(self.optimizer.param_groups):
            raise ckpt.CheckpointError(
                f"cannot resume: the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this "
                f"run's has {len(self.optimizer.param_groups)} (written by another peftmed version?); train a new run")
        groups = []
        for g, old in zip(self.optimizer.param_groups, saved["param_groups"]):
            groups.append({**{k: v for k, v in old.items() if k != "params"},
                           "params": [index[names[id(p)]] for p in g["params"]]})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore trainable tensors, optimizer, scheduler, RNG states and data position from a checkpoint."""
        found = ckpt.find_checkpoint(path)
        meta = ckpt.read_meta(found)
        components = list(getattr(getattr(self.model, "backbone", None), "components", None) or []) or None
        ckpt.check_same_run(meta, backbone=self.run_info.get("backbone"), recipe=self.run_info.get("recipe_json"),
                            components=components)
        tensors = ckpt.read_trainable(found)
        missing, unexpected = sorted(set(self.params) - set(tensors)), sorted(set(tensors) - set(self.params))
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"cannot resume from {str(found)!r}: its tensors do not match this model's trainable ones "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, p in self.params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ckpt.CheckpointError(f"cannot resume: tensor {name!r} has shape {tuple(tensors[name].shape)} "
                                           f"in the checkpoint but {tuple(p.shape)} here")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(distributed.shard_like(tensors[name].to(p.device, p.dtype), p))
        state = ckpt.read_state(found)
        try:
            self._load_optimizer_state(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler.is_enabled() and state.get("scaler"):  # fp16 continues with the scale it had
                self.scaler.load_state_dict(state["scaler"])
            rngs = state["rng"]
            same_layout = len(rngs) == self.dist.world_size
            if same_layout:
                ckpt.set_rng_state(rngs[self.dist.rank])
        except ckpt.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint state {str(found / ckpt.STATE)!r} does not hold this run's "
                                       f"optimizer, scheduler and random states ({type(exc).__name__}: "
                                       f"{str(exc)[:160]}); it was damaged: resume from another checkpoint or train "
                                       f"again") from None
        if not same_layout:
            log.warning("checkpoint was written by %d processes, this run has %d: RNG states reseeded, so "
                        "dropout masks differ from an uninterrupted run", len(rngs), self.dist.world_size)
            seed_everything(self.config.seed + 7919 * self.dist.rank + meta["step"])
        for key in ("step", "epoch", "samples", "train_seconds", "losses", "lrs", "evals"):
            self.state[key] = meta[key]
        self._resume_position(meta)
        self._last_saved = self.state["step"]
        return found

    def _resume_position(self, meta: Mapping[str, Any]) -> None:
        """Where in the data a resumed run continues: the same sample of the same epoch.

        The position is kept in samples, not batches, so a new global batch (batch size, accumulation,
        number of processes) continues exactly where the checkpoint stopped; when fewer samples than one
        global batch are left in that epoch, the next epoch starts. Changes are logged, never silent.
        """
        old_batch = int(meta.get("global_batch") or self.global_batch)
        offset = meta.get("sample_in_epoch")
        if offset is None:  # checkpoints written before positions were kept in samples
            offset = int(meta.get("batch_in_epoch", 0)) * old_batch
        offset, n = int(offset), len(self.data)
        changed = [f"{k} {meta.get(k)} -> {v}" for k, v in (("global_batch", self.global_batch),
                                                             ("world_size", self.dist.world_size),
                                                             ("dataset_size", n))
                   if meta.get(k) is not None and meta.get(k) != v]
        changed += [f"{k} {meta['config'].get(k)!r} -> {v!r}" for k, v in self.config.to_dict().items()
                    if k in ("seed",) and meta["config"].get(k) != v]
        note = f"continuing epoch {meta['epoch']} at sample {offset} of {n}"
        if offset >= n or self._steps_left(offset) == 0:
            note = (f"epoch {meta['epoch']} had {offset} of its samples trained on, leaving less than one "
                    f"global batch of {self.global_batch} of {n}; continuing with epoch {meta['epoch'] + 1}")
            self.state["epoch"] = meta["epoch"] + 1
            offset = 0
        self.state["sample_in_epoch"] = offset
        if changed and self.dist.is_main:
            exact = {c.split()[0] for c in changed} <= {"global_batch", "world_size"}
            log.warning("resuming with %s: %s%s", ", ".join(changed), note,
                        "" if exact else "; the data order differs from an uninterrupted run from here on")

    # ---- the loop ----------------------------------------------------------------------------------
    def _budget_reached(self) -> str | None:
        c, s = self.config, self.state
        if self.horizon is not None and s["step"] >= self.horizon:
            return "steps" if c.steps is not None and s["step"] >= c.steps else "epochs"
        if c.time_budget is not None and self.dist.any(s["train_seconds"] >= c.time_budget):
            return "time"
        return None

    def _step(self, micro: list) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, lr).

        With ``loss_terms`` the loss is the sum of token losses over every micro-batch and rank divided by
        the global number of target tokens (the gradients are scaled once, after the all-reduce); otherwise
        each micro-batch's mean loss counts 1 / grad_accum and ranks are averaged.
        """
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        tokens = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        by_tokens = None
        for i, batch in enumerate(micro):
            batch = _move(batch, self.dist.device)
            with distributed.no_sync(self.wrapped, skip=i < len(micro) - 1), \
                    torch.autocast(self.dist.device.type, dtype=self.autocast_dtype or torch.float32,
                                   enabled=self.autocast_dtype is not None):
                out = self.wrapped(batch)
                terms = isinstance(out, tuple)
                if by_tokens is None:
                    by_tokens = terms
                loss, count = (out if terms else (out, None))
                if loss.dim() != 0:
                    raise PeftmedError(f"the model's loss must be a scalar tensor, got shape {tuple(loss.shape)}")
                loss = loss.float() if terms else loss.float() / len(micro)
            self.scaler.scale(loss).backward()
            total += loss.detach().double()
            if terms:
                tokens += float(count)
        if self.state["step"] == 0 and not any(p.grad is not None for p in self.params.values()):
            # the reference code's trap: a method wired into a path the loss never reaches (e.g. an inert prefix)
            raise PeftmedError("the trainable parameters received no gradient in the first step: the recipe's "
                               "methods are not on the path from the inputs to the loss (an inert adapter)")
        if by_tokens:
            total, tokens = self.dist.sum(total), self.dist.sum(tokens)
            if float(tokens) <= 0:
                raise PeftmedError(f"step {self.state['step'] + 1}: the batch has no target token to learn from")
            # DDP averaged the per-rank sums over ranks: x world_size / global tokens = sum / tokens
            scale = self.dist.world_size / float(tokens)
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(scale)
            value = float(total / tokens)
        else:
            value = float(self.dist.mean(total))
        self.scaler.unscale_(self.optimizer)
        grad_norm = distributed.clip_grad_norm(self.wrapped, list(self.params.values()), c.max_grad_norm)
        if self.scaler.is_enabled() and math.isfinite(value) and not math.isfinite(float(grad_norm)):
            self.scaler.step(self.optimizer)  # an fp16 overflow: the scaler skips this update and lowers the scale
            self.scaler.update()
            log.warning("step %d: fp16 gradients overflowed; update skipped, loss scale now %g",
                        self.state["step"] + 1, self.scaler.get_scale())
            self.scheduler.step()
            return value, self.optimizer.param_groups[0]["lr"]
        bad = None if math.isfinite(value) else f"loss is {value}"
        if bad is None and not math.isfinite(float(grad_norm)):
            bad = f"gradient norm is {float(grad_norm)}"
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            where = (f"the last good checkpoint is {ckpt.latest_checkpoint(self.checkpoint_root)}"
                     if self.checkpoint_root is not None and ckpt.latest_checkpoint(self.checkpoint_root)
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"training stopped at step {self.state['step'] + 1}: the {bad}; the update was not applied and "
                f"{where}. Lower --lr, raise --warmup-steps or --max-grad-norm, or check the data")
        self.last_grad_norm = float(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)  # optimizer.step() unless fp16 loss scaling is on
        self.scaler.update()
        self.scheduler.step()
        return value, lr

    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Train until the budget (steps, epochs or seconds) is reached; checkpoint and evaluate on the way.

        ``resume``: True continues the latest checkpoint under ``output_dir``; a path continues that
        checkpoint (or the latest under that folder).
        """
        self._setup()
        c, s, d = self.config, self.state, self.dist
        try:
            if resume:
                if resume is True and self.output_dir is None:
                    raise ConfigError("resume=True needs an output_dir to find the checkpoint in")
                found = self.load_checkpoint(self.output_dir if resume is True else resume)
                if d.is_main:
                    log.info("resumed from %s at step %d", found, s["step"])
            else:
                seed_everything(c.seed + 7919 * d.rank)  # ranks draw different dropout masks
                self._last_saved = -1
            return self._loop()
        finally:
            if self.loggers is not None and (sys.exc_info()[0] is not None or not self.keep_loggers_open):
                self.loggers.close()  # an interrupted run keeps the curves it logged
                self.loggers = None
            d.close(clean=sys.exc_info()[0] is None)

    def _loop(self) -> TrainResult:
        c, s, d = self.config, self.state, self.dist
        self.wrapped.train()
        bar = self._progress_bar()
        stopped = self._budget_reached()
        window_samples, window_start = 0, time.perf_counter()
        n = len(self.data)
        try:
            with self._signals() as caught:
                while stopped is None:
                    left = self._steps_left(s["sample_in_epoch"])
                    if left == 0:
                        s["epoch"] += 1
                        s["sample_in_epoch"] = 0
                        continue
                    loader = iter(self._loader(s["epoch"], s["sample_in_epoch"]))
                    for _ in range(left):
                        t0 = time.perf_counter()
                        micro = [next(loader) for _ in range(c.grad_accum)]
                        loss, lr = self._step(micro)
                        s["step"] += 1
                        s["sample_in_epoch"] += self.global_batch
                        s["samples"] += self.global_batch
                        s["losses"].append(loss)
                        s["lrs"].append(lr)
                        elapsed = time.perf_counter() - t0
                        s["train_seconds"] += elapsed
                        self.step_seconds.append(elapsed)
                        window_samples += self.global_batch
                        rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                        if self._steps_left(s["sample_in_epoch"]) == 0:
                            s["epoch"] += 1
                            s["sample_in_epoch"] = 0
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}",
                                            refresh=False)
                        if d.is_main and s["step"] % c.log_every == 0:
                            log.info("step %d  loss %.4f  lr %.3e  %.1f samples/s", s["step"], loss, lr, rate)
                        if self.loggers is not None:
                            self._report_step(loss, rate)
                        signum = self._signal_received(caught)
                        if signum is not None:
                            path = self.save_checkpoint() if self._last_saved != s["step"] else \
                                (ckpt.latest_checkpoint(self.checkpoint_root) if self.checkpoint_root else None)
                            raise TrainingInterrupted(signum, s["step"], path if self.checkpoint_root else None)
                        stopped = self._budget_reached()
                        if c.eval_every and s["step"] % c.eval_every == 0 and stopped is None:
                            self._evaluate(c.eval_samples)
                        if c.save_every and s["step"] % c.save_every == 0 and stopped is None:
                            self.save_checkpoint()
                        if stopped is not None:
                            break
        finally:
            if bar is not None:
                bar.close()
        path = None
        if self._last_saved != s["step"]:
            path = self.save_checkpoint()
        elif self.checkpoint_root is not None:
            path = ckpt.latest_checkpoint(self.checkpoint_root)
        if self.output_dir is not None and hasattr(self.model, "save_adapter"):
            tensors = self._full_tensors()  # a collective when sharded
            if d.is_main:
                self.model.save_adapter(self.output_dir / "adapter", tensors=tensors)
        if self.loggers is not None and not self.keep_loggers_open:
            self.close_loggers()
        return TrainResult(
            step=s["step"], epoch=s["epoch"] + s["sample_in_epoch"] / n,
            losses=list(s["losses"]), lrs=list(s["lrs"]), evals=list(s["evals"]), stopped_by=stopped,
            checkpoint=path, samples_per_second=s["samples"] / max(1e-9, s["train_seconds"]),
            train_seconds=s["train_seconds"], step_seconds=list(self.step_seconds))

    # ---- signals -----------------------------------------------------------------------------------
    def _signals(self):
        """Inside the block, SIGINT and SIGTERM set a flag the loop reads at each step boundary; a second
        signal aborts at once (KeyboardInterrupt). Only the main thread can own signal handlers."""
        trainer = self

        class _Guard:
            def __enter__(self):
                self.caught: list[int] = []
                self.previous = {}
                if threading.current_thread() is not threading.main_thread():
                    return self.caught
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self.handle)
                return self.caught

            def handle(self, signum, frame):
                if self.caught:
                    raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a checkpoint")
                self.caught.append(signum)
                if trainer.dist.is_main:
                    print(f"\npeftmed: {signal.Signals(signum).name} received: stopping after the current step "
                          f"and writing a checkpoint ({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again "
                          f"aborts at once)", file=sys.stderr, flush=True)

            def __exit__(self, *exc):
                for sig, handler in self.previous.items():
                    signal.signal(sig, handler)
                return False

        return _Guard()

    def _signal_received(self, caught: list[int]) -> int | None:
        """The signal that asks this run to stop, agreed by every rank (any rank's signal stops all)."""
        local = caught[0] if caught else None
        if not self.dist.enabled:
            return local
        if self.dist.any(local is not None):
            return local if local is not None else signal.SIGTERM
        return None

    def _evaluate(self, limit: int | None) -> dict | None:
        if self.eval_fn is None:
            return None
        scores = None
        if self.dist.is_main:
            was_training = self.model.training
            self.model.eval()
            try:
                scores = dict(self.eval_fn(self.model, limit))
            finally:
                self.model.train(was_training)
            self.state["evals"].append({"step": self.state["step"], **scores})
            if self.loggers is not None:
                self.loggers.scalars(self.state["step"], {f"eval/{k}": v for k, v in scores.items()
                                                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            log.info("step %d  eval %s", self.state["step"],
                     "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        self.dist.barrier()
        return scores

    def _progress_bar(self):
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        # the total gives tqdm's ETA; a time budget alone has no step total
        return tqdm(total=self.horizon, initial=self.state["step"], desc="train", unit="step", dynamic_ncols=True)


def _peak_mib(device: torch.device) -> float:
    """The peak memory so far: the CUDA allocator's on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
