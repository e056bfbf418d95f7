"""``peftmed plan``: will this recipe fit on my GPU? Memory of one training step, per component.

- weights: counted on the full model built on the meta device (no memory) after the recipe, by the
  rules of ``--base-dtype`` (frozen weights in its dtype, norms and trainable tensors fp32) and
  ``--quantize nf4`` (0.516 bytes per quantized weight, statistics included);
- gradients: 4 bytes per trainable value (fp32); optimizer states: AdamW's two moments, 8 bytes each;
- activations: measured, not modelled. The same architecture is built for real at reduced depth (2 layers
  per layer stack, then 3 in one stack at a time, at the real widths, image size, text length and batch
  size, with the recipe, dtype, quantization and checkpointing of the run), one training step (forward
  and backward) runs while every tensor's storage is counted (:class:`LiveTensors`), and the peak of that
  growth less the gradients (the activation memory at its peak) is extrapolated
  linearly in each stack's depth to the full model. Per component, the tensors saved for the backward
  pass are attributed to the component that saved them; what is left (logits and the loss, gradient
  buffers of the backward pass, a checkpointed block's recomputation) is the "transient" row.

Where it is weakest: the measurement runs on this machine's kernels (on a CPU, the CPU attention and LoRA
kernels, whose saved tensors match the GPU ones but whose temporary buffers may not); allocator caching
and fragmentation and the CUDA context (~0.3-0.6 GB) are not in it; activations are taken as linear in
batch size for the largest batch that fits. ``benchmarks/plan_accuracy.py`` measures it against real steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError

GIB = 1024**3
MIB = 1024**2
ADAM_BYTES = 8  # two fp32 moments per trainable value
# words whose word pieces are single tokens in every built-in tokenizer (the synthetic questions repeat them)
FILLER = "lung"


@dataclasses.dataclass
class PlanRow:
    component: str
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclasses.dataclass
class MemoryPlan:
    backbone: str
    recipe: str
    batch_size: int
    settings: dict[str, Any]
    rows: list[PlanRow]
    transient: int  # activation memory not saved by a component (logits, backward buffers, recomputation)
    depths: dict[str, int]  # full depth of each layer stack the activations were extrapolated to
    measured_depths: list[dict[str, int]]  # the reduced models measured

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.rows)

    @property
    def activations(self) -> int:
        return sum(r.activations for r in self.rows) + self.transient

    @property
    def fixed(self) -> int:
        """What does not grow with the batch: weights, gradients, optimizer states."""
        return sum(r.weights + r.gradients + r.optimizer for r in self.rows)

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def largest_batch(self, gpu_bytes: float, reserve: float) -> int:
        """The largest batch whose estimate fits in ``gpu_bytes - reserve`` (activations linear in batch)."""
        room = gpu_bytes - reserve - self.fixed
        per_sample = self.activations / self.batch_size
        if room <= 0 or per_sample <= 0:
            return 0
        return int(room // per_sample)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "recipe": self.recipe, "batch_size": self.batch_size,
                "settings": self.settings, "depths": self.depths, "measured_depths": self.measured_depths,
                "rows": [dataclasses.asdict(r) for r in self.rows], "transient": self.transient,
                "weights": self.weights, "activations": self.activations, "total": self.total}

    def table(self) -> str:
        head = f"{'component':<10} {'weights':>10} {'gradients':>10} {'optimizer':>10} {'activations':>12} {'total':>10}"
        lines = [f"backbone {self.backbone}  recipe {self.recipe}  batch {self.batch_size}  "
                 + "  ".join(f"{k} {v}" for k, v in self.settings.items() if v not in (None, "none")),
                 head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.component:<10} {_size(r.weights):>10} {_size(r.gradients):>10} {_size(r.optimizer):>10} "
                         f"{_size(r.activations):>12} {_size(r.total):>10}")
        lines.append(f"{'transient':<10} {'':>10} {'':>10} {'':>10} {_size(self.transient):>12} "
                     f"{_size(self.transient):>10}")
        lines.append("-" * len(head))
        grads = sum(r.gradients for r in self.rows)
        opt = sum(r.optimizer for r in self.rows)
        lines.append(f"{'total':<10} {_size(self.weights):>10} {_size(grads):>10} {_size(opt):>10} "
                     f"{_size(self.activations):>12} {_size(self.total):>10}")
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GB" if n >= GIB else f"{n / MIB:.1f} MB"


# ---- weights, gradients, optimizer states (the full model on the meta device) --------------------------
def _static_rows(pm, base_dtype: torch.dtype | None, quantize: str, quantize_components) -> list[PlanRow]:
    from ..methods.base import adapter_parameter_ids
    from .precision import _is_norm
    from .quantize import NF4_BYTES_PER_WEIGHT, quantizable_linears

    backbone = pm.backbone
    quantized: set[int] = set()
    if quantize == "nf4":
        for found in quantizable_linears(pm, quantize_components)[1]:
            quantized |= {id(m.weight) for _, m in found}
    trainable = {id(p) for p in pm.adapter_tensors().values()}
    added = adapter_parameter_ids(pm.base_model)
    rows = {c: PlanRow(c, 0, 0, 0, 0, 0) for c in backbone.components}
    seen: set[int] = set()
    low = base_dtype.itemsize if base_dtype is not None else 4
    for mod_name, module in pm.base_model.named_modules():
        norm = _is_norm(module)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            from ..methods.base import canonical_name

            comp = backbone.component_of(canonical_name(f"{mod_name}.{pname}" if mod_name else pname))
            if comp is None:
                continue
            row = rows[comp]
            if id(p) in trainable:
                row.weights += 4 * p.numel()
                row.trainable += p.numel()
                row.gradients += 4 * p.numel()
                row.optimizer += ADAM_BYTES * p.numel()
            elif id(p) in quantized:
                row.weights += math.ceil(NF4_BYTES_PER_WEIGHT * p.numel())
            elif norm or id(p) in added:
                row.weights += 4 * p.numel()
            else:
                row.weights += (low if p.is_floating_point() else p.element_size()) * p.numel()
    for module in pm.prompt_modules.values():  # prompt-family parameters live outside the base model
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            comp = getattr(module, "component", None)
            row = rows.get(comp) or next(iter(rows.values()))
            row.weights += 4 * p.numel()
            row.trainable += p.numel()
            row.gradients += 4 * p.numel()
            row.optimizer += ADAM_BYTES * p.numel()
    return list(rows.values())


# ---- activations (reduced-depth models, measured) -------------------------------------------------------
def synthetic_batch(model, batch_size: int, seq_len: int, answer_len: int, image_size: int) -> dict:
    """Random images, and questions (answers) of ``seq_len`` (``answer_len``) words: at least as many tokens,
    so the model's token limits (set to these lengths) make every sequence exactly that long."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    question = " ".join([FILLER] * seq_len) + "?"
    answer = " ".join([FILLER] * answer_len)
    return {"images": images, "questions": [question] * batch_size, "answers": [answer] * batch_size,
            "qids": list(range(batch_size))}


def _component_hooks(pm, counter: dict[str, int]):
    """Attribute every tensor saved for backward to the component running when it is saved."""
    stack: list[str] = []
    handles = []

    def enter(component):
        def hook(module, args):
            stack.append(component)
        return hook

    def leave(module, args, output):
        if stack:
            stack.pop()  # returns None: a forward hook's return value would replace the output

    for comp in pm.backbone.components:
        for _, root in pm.backbone.component_roots(pm.base_model, comp):
            handles.append(root.register_forward_pre_hook(enter(comp)))
            handles.append(root.register_forward_hook(leave))
    params = {p.untyped_storage().data_ptr() for p in pm.parameters() if p.device.type != "meta"}
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return t
        if ptr and ptr not in params and ptr not in seen:
            seen.add(ptr)
            key = stack[-1] if stack else "transient"
            counter[key] = counter.get(key, 0) + storage.nbytes()
        return t

    return handles, pack


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside it while they are alive, and their peak: the CPU
    counterpart of ``torch.cuda.max_memory_allocated`` growth (every op's outputs, through the dispatcher,
    C++ extensions and bitsandbytes included; storages that existed before do not count)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = id(storage)
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def measure_step(pm, batch: dict, *, optimizer_step: bool = False) -> dict[str, Any]:
    """One training step (forward + backward, optionally AdamW's update) of ``pm`` on ``batch``: the peak growth
    of live tensor memory (:class:`LiveTensors`), the gradients' bytes at the end, the activations
    (peak growth - gradients - optimizer states) and the bytes saved for backward per component."""
    from .precision import autocast_for

    pm.train()
    saved: dict[str, int] = {}
    handles, pack = _component_hooks(pm, saved)
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=1e-6) if optimizer_step else None
    device = next(pm.parameters()).device
    tracker = LiveTensors()
    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast_for(pm, device):
                out = pm.loss_terms(batch) if callable(getattr(pm, "loss_terms", None)) else pm.compute_loss(batch)
            loss = out[0] if isinstance(out, tuple) else out
            loss.float().backward()
            del out, loss
            if opt is not None:
                opt.step()
    finally:
        for h in handles:
            h.remove()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    states = sum(t.numel() * t.element_size() for st in (opt.state.values() if opt else ()) for t in st.values()
                 if torch.is_tensor(t))
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in pm.parameters()}.values())
    return {"peak": tracker.peak, "weights": weights, "gradients": grads, "optimizer": states,
            "activations": max(tracker.peak - grads - states, 0), "saved": saved}


def _reduced_options(backbone, options: dict, depths: Mapping[str, int]) -> dict:
    return {**options, **depths}


def _full_depths(backbone, pm_meta) -> dict[str, int]:
    from .checkpointing import component_blocks

    depths = {}
    for option, comps in backbone.depth_options.items():
        depths[option] = len(component_blocks(pm_meta, comps[0]))
    return depths


def plan_memory(backbone, recipe, *, registry=None, batch_size: int = 1, seq_len: int | None = None,
                answer_len: int = 8, image_size: int | None = None, base_dtype="fp32", grad_checkpoint=None,
                quantize: str = "none", quantize_components=None, backbone_options: Mapping | None = None,
                device: str = "cpu") -> MemoryPlan:
    """Estimate the memory of a training step of ``recipe`` on ``backbone`` (see the module doc)."""
    from ..model import apply
    from ..plugins import default_registry
    from ..recipe import Recipe
    from . import prepare
    from .checkpointing import parse_components
    from .precision import parse_base_dtype

    registry = registry or default_registry()
    backbone = registry.backbone(backbone) if isinstance(backbone, str) else backbone
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if not backbone.depth_options:
        raise ConfigError(f"backbone {backbone.name!r} declares no depth_options, so peftmed plan cannot build the "
                          f"shallower copies it measures activations on")
    recipe = Recipe.parse(recipe, components=list(backbone.components)).canonical(registry)
    dtype = parse_base_dtype(base_dtype)
    parse_components(grad_checkpoint, list(backbone.components))
    options = dict(backbone_options or {})
    if image_size is not None:
        options["image_size"] = int(image_size)
    seq = int(seq_len or 16)
    options.setdefault("max_question_tokens", seq)
    options.setdefault("max_answer_tokens", int(answer_len))

    with torch.device("meta"):
        full = backbone.build(**options)
    pm_full = apply(full, recipe, backbone=backbone, registry=registry, keep_base=False)
    rows = _static_rows(pm_full, dtype, quantize, quantize_components)
    depths = _full_depths(backbone, pm_full)
    size = int(getattr(full, "image_size", None) or image_size or 224)

    def measure(setting: dict[str, int]) -> dict:
        logging.disable(logging.WARNING)  # the synthetic texts are cut to the token limits on purpose
        try:
            return _measure(setting)
        finally:
            logging.disable(logging.NOTSET)

    def _measure(setting: dict[str, int]) -> dict:
        torch.manual_seed(0)
        with torch.device(device):
            model = backbone.build(**_reduced_options(backbone, options, setting))
        pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        prepare(pm, base_dtype=base_dtype, grad_checkpoint=grad_checkpoint, quantize=quantize,
                quantize_components=quantize_components, device=torch.device(device) if quantize != "none" else None)
        pm.to(device)
        return measure_step(pm, synthetic_batch(model, batch_size, seq, answer_len, size))

    base = {k: min(2, v) for k, v in depths.items()}
    m0 = measure(base)
    measured = [dict(base)]
    activations = float(m0["activations"])
    saved = {k: float(v) for k, v in m0["saved"].items()}
    for option, comps in backbone.depth_options.items():
        extra = depths[option] - base[option]
        if extra <= 0:
            continue
        setting = {**base, option: base[option] + 1}
        m1 = measure(setting)
        measured.append(setting)
        activations += extra * (m1["activations"] - m0["activations"])
        for comp in comps:
            saved[comp] = saved.get(comp, 0.0) + extra * (m1["saved"].get(comp, 0) - m0["saved"].get(comp, 0))
    per_comp = {c: max(int(saved.get(c, 0.0)), 0) for c in backbone.components}
    for row in rows:
        row.activations = per_comp[row.component]
    transient = max(int(activations) - sum(per_comp.values()), 0)
    settings = {"base_dtype": base_dtype, "grad_checkpoint": grad_checkpoint, "quantize": quantize,
                "seq_len": seq, "image_size": size}
    return MemoryPlan(backbone.name, recipe.to_text(), batch_size, settings, rows, transient, depths, measured)


def measure_training_step(backbone, recipe, *, registry=None, batch_size: int = 1, seq_len: int = 16,
                          answer_len: int = 8, image_size: int | None = None, base_dtype="fp32", grad_checkpoint=None,
                          quantize: str = "none", quantize_components=None, backbone_options: Mapping | None = None,
                          device: str = "cpu") -> dict[str, int]:
    """What :func:`plan_memory` estimates, measured: the full model built for real, one training step
    (forward, backward, AdamW update). On a GPU the peak is ``torch.cuda.max_memory_allocated``; on a CPU,
    the weights plus the peak growth of live tensors during the step (:class:`LiveTensors`)."""
    from ..model import apply
    from ..plugins import default_registry
    from ..recipe import Recipe
    from . import prepare

    registry = registry or default_registry()
    backbone = registry.backbone(backbone) if isinstance(backbone, str) else backbone
    recipe = Recipe.parse(recipe, components=list(backbone.components)).canonical(registry)
    options = dict(backbone_options or {})
    if image_size is not None:
        options["image_size"] = int(image_size)
    options.setdefault("max_question_tokens", int(seq_len))
    options.setdefault("max_answer_tokens", int(answer_len))
    dev = torch.device(device)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    try:
        model = backbone.build(**options)
        pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        prepare(pm, base_dtype=base_dtype, grad_checkpoint=grad_checkpoint, quantize=quantize,
                quantize_components=quantize_components, device=dev if quantize != "none" else None)
        pm.to(dev)
        batch = synthetic_batch(model, batch_size, seq_len, answer_len, int(model.image_size))
        batch["images"] = batch["images"].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            start = torch.cuda.memory_allocated(dev)
            result = measure_step(pm, batch, optimizer_step=True)
            torch.cuda.synchronize(dev)
            result["total"] = torch.cuda.max_memory_allocated(dev)
            result["before_step"] = start
        else:
            result = measure_step(pm, batch, optimizer_step=True)
            result["total"] = result["weights"] + result["peak"]
    finally:
        logging.disable(logging.NOTSET)
    result.pop("saved", None)
    return result
