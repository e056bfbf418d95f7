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
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError
from ..methods.base import adapter_parameter_ids, canonical_name
from ..model import apply
from ..plugins import default_registry
from ..recipe import Recipe
from ..runtime import adamw
from . import prepare
from .checkpointing import component_blocks, parse_components
from .precision import _is_norm, autocast_for, parse_base_dtype
from .quantize import NF4_BYTES_PER_WEIGHT, default_components, quantizable_linears

GIB = 1024**3
MIB = 1024**2
ADAM_BYTES = 8  # two fp32 moments per trainable value
MEASURE_AT_FULL_WIDTH = 1_500_000_000  # parameters: above this, activations are measured on narrow copies
WIDTH_DIVISORS = (16, 32)
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
    optimizer_temporaries: int = 0  # what AdamW's update holds beside its states (after the backward pass)
    alternatives: dict[str, int] = dataclasses.field(default_factory=dict)  # memory options not used -> weights

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
        """The step's peak: the weights, gradients and AdamW states, plus the larger of what the forward and
        backward passes hold (activations) and what the optimizer's update holds (its temporaries)."""
        return self.fixed + max(self.activations, self.optimizer_temporaries)

    def largest_batch(self, gpu_bytes: float, reserve: float) -> int:
        """The largest batch whose estimate fits in ``gpu_bytes - reserve`` (activations linear in batch)."""
        room = gpu_bytes - reserve - self.fixed
        per_sample = self.activations / self.batch_size
        if room <= 0 or per_sample <= 0 or room < self.optimizer_temporaries:
            return 0
        return int(room // per_sample)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "recipe": self.recipe, "batch_size": self.batch_size,
                "settings": self.settings, "depths": self.depths, "measured_depths": self.measured_depths,
                "rows": [dataclasses.asdict(r) for r in self.rows], "transient": self.transient,
                "weights": self.weights, "activations": self.activations,
                "optimizer_temporaries": self.optimizer_temporaries, "total": self.total}

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
        if self.optimizer_temporaries > self.activations:
            lines.append(f"the optimizer's update holds {_size(self.optimizer_temporaries)} beside its states, more than "
                         f"the activations: the step's peak ({_size(self.total)}) is at the update")
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GB" if n >= GIB else f"{n / MIB:.1f} MB"


# ---- weights, gradients, optimizer states (the full model on the meta device) --------------------------
def _static_rows(pm, base_dtype: torch.dtype | None, quantize: str, quantize_components) -> list[PlanRow]:
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
    # prompt-family parameters live outside the base model; each belongs to the component it was applied to
    component_of = {a.prompt_key: a.component for state in pm.adapters.values() for a in state.applied
                    if a.prompt_key is not None}
    for key, module in pm.prompt_modules.items():
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            row = rows[component_of[key]]
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
            # a ModuleList (Qwen2-VL's vision blocks) is iterated, never called: its hooks would never run
            for module in root.children() if isinstance(root, (nn.ModuleList, nn.ModuleDict)) else (root,):
                handles.append(module.register_forward_pre_hook(enter(comp)))
                handles.append(module.register_forward_hook(leave))
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
    C++ extensions and bitsandbytes included).

    Storage identity decides what is new: an op's output that shares the storage of a tensor that existed
    before (a view or transpose of a frozen weight, what every ``nn.Linear`` makes; an in-place result) is
    not new memory. Storages first seen as an op's input, and those of ``existing`` tensors, existed before."""

    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.old: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for t in existing:
            self._remember(t)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    @staticmethod
    def _storage(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return None

    def _remember(self, t) -> None:
        """``t``'s storage existed before: never counted (it is forgotten when it dies, its id may come back)."""
        storage = self._storage(t)
        if storage is None:
            return
        key = id(storage)
        if key not in self.live and key not in self.old:
            self.old[key] = weakref.ref(storage, lambda _, k=key: self.old.pop(k, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            self._remember(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            storage = self._storage(t)
            if storage is None:
                continue
            key = id(storage)
            if key in self.live or key in self.old or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def measure_step(pm, batch: dict, *, optimizer_step: bool = False) -> dict[str, Any]:
    """One training step (forward + backward, optionally AdamW's update) of ``pm`` on ``batch``, counted by
    :class:`LiveTensors`: the peak growth of the forward and backward passes (``peak``, gradients included as
    they appear), the gradients' bytes at the end, the activations (``peak`` - gradients), the bytes saved for
    backward per component, and with ``optimizer_step`` AdamW's states and the temporaries its update holds
    on top of them (``optimizer_temporaries``)."""
    pm.train()
    saved: dict[str, int] = {}
    handles, pack = _component_hooks(pm, saved)
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    opt = adamw(params, lr=1e-6) if optimizer_step else None  # the trainer's AdamW (fused where it can be)
    device = next(pm.parameters()).device
    tracker = LiveTensors(existing=[*pm.parameters(), *pm.buffers()])
    temporaries = 0
    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast_for(pm, device):
                out = pm.loss_terms(batch) if callable(getattr(pm, "loss_terms", None)) else pm.compute_loss(batch)
            loss = out[0] if isinstance(out, tuple) else out
            loss.float().backward()
            del out, loss
            peak = tracker.peak
            if opt is not None:
                before, tracker.peak = tracker.current, tracker.current
                opt.step()
                temporaries = tracker.peak - before
    finally:
        for h in handles:
            h.remove()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    states = sum(t.numel() * t.element_size() for st in (opt.state.values() if opt else ()) for t in st.values()
                 if torch.is_tensor(t))
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in pm.parameters()}.values())
    trainable = sum(p.numel() * p.element_size() for p in params)
    return {"peak": peak, "weights": weights, "gradients": grads, "optimizer": states, "trainable": trainable,
            "optimizer_temporaries": max(temporaries - states, 0), "activations": max(peak - grads, 0),
            "saved": saved}


def build_undrawn(backbone, **options) -> nn.Module:
    """``backbone.build(**options)`` with zeros for weights instead of random draws: the memory of a step does not
    depend on the values, and drawing them was half of ``peftmed plan``'s time (33 of 68 s on medgemma-4b's
    copies). torch's and transformers' initialisers do nothing during the build (transformers' own switch, the one
    its loading uses), then every parameter is zeroed, so no value is left uninitialised (a NaN could take another
    path). Buffers (positions, rotary frequencies) are computed as always."""
    from transformers.initialization import no_init_weights  # deferred: transformers takes seconds to import

    with no_init_weights():
        model = backbone.build(**options)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.zero_()
    return model


def _reduced_options(backbone, options: dict, depths: Mapping[str, int]) -> dict:
    return {**options, **depths}


def _full_depths(backbone, pm_meta) -> dict[str, int]:
    depths = {}
    for option, comps in backbone.depth_options.items():
        depths[option] = len(component_blocks(pm_meta, comps[0]))
    return depths


def plan_memory(backbone, recipe, *, registry=None, batch_size: int = 1, seq_len: int | None = None,
                answer_len: int = 8, image_size: int | None = None, base_dtype="fp32", grad_checkpoint=None,
                quantize: str = "none", quantize_components=None, backbone_options: Mapping | None = None,
                device: str = "cpu") -> MemoryPlan:
    """Estimate the memory of a training step of ``recipe`` on ``backbone`` (see the module doc)."""
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

    total_params = sum(p.numel() for p in full.parameters())
    divisors = _width_divisors(backbone, options) if backbone.width_option and total_params > MEASURE_AT_FULL_WIDTH \
        else None

    def measure(setting: dict[str, int], optimizer: bool = False) -> dict:
        logging.disable(logging.WARNING)  # the synthetic texts are cut to the token limits on purpose
        try:
            if divisors is None:
                return _measure(setting, optimizer)
            # activations = (a part proportional to the width) / divisor + (a part that does not depend on it:
            # attention scores, logits, images): two narrow copies give both parts, and so the real width's
            d1, d2 = divisors
            m1 = _measure({**setting, backbone.width_option: d1}, optimizer)
            m2 = _measure({**setting, backbone.width_option: d2}, optimizer)
            return _extrapolate_width(m1, m2, d1, d2)
        finally:
            logging.disable(logging.NOTSET)

    def _measure(setting: dict[str, int], optimizer: bool) -> dict:
        torch.manual_seed(0)
        with torch.device(device):
            model = build_undrawn(backbone, **_reduced_options(backbone, options, setting))
        pm = apply(model, recipe, backbone=backbone, registry=registry, keep_base=False)
        prepare(pm, base_dtype=base_dtype, grad_checkpoint=grad_checkpoint, quantize=quantize,
                quantize_components=quantize_components, device=torch.device(device) if quantize != "none" else None)
        pm.to(device)
        return measure_step(pm, synthetic_batch(model, batch_size, seq, answer_len, size), optimizer_step=optimizer)

    base = {k: min(2, v) for k, v in depths.items()}
    m0 = measure(base, optimizer=True)
    measured = [dict(base)]
    activations = float(m0["activations"])
    # AdamW's update holds temporaries beside its states, in proportion to what trains: measured on the copy
    temporaries_per_byte = m0["optimizer_temporaries"] / max(m0["trainable"], 1)
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
    method = (f"measured at widths 1/{divisors[0]} and 1/{divisors[1]}, extrapolated to the real width"
              if divisors else "measured at the real width")
    settings = {"base_dtype": base_dtype, "grad_checkpoint": grad_checkpoint, "quantize": quantize,
                "seq_len": seq, "image_size": size, "activations": method}
    optimizer_temporaries = int(temporaries_per_byte * sum(r.gradients for r in rows))
    return MemoryPlan(backbone.name, recipe.to_text(), batch_size, settings, rows, transient, depths, measured,
                      optimizer_temporaries, _alternatives(pm_full, base_dtype, quantize, quantize_components))


def _alternatives(pm, base_dtype, quantize: str, quantize_components) -> dict[str, int]:
    """The weights under the memory options this plan does not use yet (counted on the same meta model)."""
    options = []
    if base_dtype in (None, "fp32", "auto"):
        options.append(("--base-dtype bf16", torch.bfloat16, "none"))
    if quantize == "none":
        try:
            if not quantize_components:
                default_components(pm.backbone)
            options.append(("--base-dtype bf16 --quantize nf4", torch.bfloat16, "nf4"))
        except ConfigError:  # no llm component: quantizing would need --quantize-components
            pass
    out = {}
    for label, dtype, q in options:
        try:
            out[label] = sum(r.weights for r in _static_rows(pm, dtype, q, quantize_components))
        except ConfigError:  # e.g. a component trained in full cannot be quantized
            continue
    return out


def _width_divisors(backbone, options: dict) -> tuple[int, int] | None:
    """The narrowest pair of widths (1/d, 1/2d) the architecture can be built at: every head keeps an even,
    whole width (a SigLIP tower's 16 heads of 72 allow 1/2 and 1/4, not 1/16); None: measure at the real width."""
    for pair in (WIDTH_DIVISORS, (8, 16), (4, 8), (2, 4)):
        try:
            with torch.device("meta"):
                for d in pair:
                    backbone.build(**{**options, backbone.width_option: d})
            return pair
        except ConfigError:
            continue
    return None


def _extrapolate_width(m1: dict, m2: dict, d1: int, d2: int) -> dict:
    """Measures at widths 1/d1 and 1/d2 -> the real width's, each figure taken as a / d + c."""
    def at_full(v1: float, v2: float) -> float:
        a = (v1 - v2) / (1 / d1 - 1 / d2)
        return max(a + v2 - a / d2, 0.0)

    out = {k: at_full(m1[k], m2[k]) for k in ("activations", "optimizer_temporaries", "trainable", "peak")}
    out["saved"] = {k: at_full(m1["saved"].get(k, 0), m2["saved"].get(k, 0)) for k in set(m1["saved"]) | set(m2["saved"])}
    return out
