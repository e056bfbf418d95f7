"""The model wrapper: apply a recipe, report trainable parameters, save/load, merge, several adapters.

    model = peftmed.build_backbone("miss-tiny")
    pm = peftmed.apply(model, "vision=full fusion=lora(r=8,alpha=16) decoder=lora(r=8,alpha=16)")
    print(pm.trainable_report())
    pm.save_adapter("out/adapter")
    pm2 = peftmed.load_adapter(peftmed.build_backbone("miss-tiny"), "out/adapter")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .backbones.base import Backbone
from .errors import AdapterError, NoMatchError, PeftmedError, RecipeError, UnknownNameError
from .files import sha256_file, write_bytes_atomic, write_json_atomic
from .methods.base import (
    AdapterLayer,
    ApplyContext,
    Method,
    MethodConfig,
    PromptModule,
    adapter_parameter_ids,
    canonical_name,
    logical_numel,
    unwrap,
)
from .plugins import Registry, default_registry
from .recipe import Recipe
from .tasks import answer as answer_with
from .tokenizer_files import tokenizer_fingerprint

log = logging.getLogger("peftmed.model")

MANIFEST = "adapter.json"
WEIGHTS = "adapter.safetensors"
FORMAT = "peftmed-adapter"
FORMAT_VERSION = 1
MANIFEST_KEYS = {
    "format", "format_version", "peftmed_version", "torch_version", "plugins", "backbone",
    "adapter_name", "recipe", "recipe_json", "methods", "tensors", "trainable", "weights_sha256", "tokenizer",
}
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DTYPES = {"float32", "float16", "bfloat16", "float64"}


def check_adapter_name(name: Any) -> str:
    """Adapter names become keys of torch parameter dicts: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterError(f"adapter name {name!r} is not valid: use 1-64 letters, digits, '_' or '-' "
                           f"(no '.', which torch reserves for module paths)")
    return name


@dataclass
class AppliedMethod:
    """One method applied to one component of one adapter."""

    component: str
    method: Method
    config: MethodConfig
    layers: dict[str, AdapterLayer] = field(default_factory=dict)  # inject: module name -> layer
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # select (+ inject extras)
    prompt_key: str | None = None  # prompt: key in PeftModel.prompt_modules
    skipped: dict[str, int] = field(default_factory=dict)  # modules/parameters left out: they cannot learn

    def tensors(self, owner: PeftModel, adapter: str) -> dict[str, nn.Parameter]:
        """Canonical tensor name -> parameter, as saved in an adapter file."""
        out: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for attr, p in layer.adapter_state(adapter).items():
                out[f"{canonical_name(name)}.{attr}"] = p
        out.update(self.params)
        if self.prompt_key is not None:
            module = owner.prompt_modules[self.prompt_key]
            for n, p in module.named_parameters():
                out[f"prompt.{self.component}.{self.method.name}.{n}"] = p
        return out


@dataclass
class AdapterState:
    name: str
    recipe: Recipe
    applied: list[AppliedMethod] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # wildcard components the method had nothing in
    saved_values: dict[str, torch.Tensor] | None = None  # select values while inactive


class PeftModel(nn.Module):
    """A model with named adapters, one active. Calls and unknown attributes go to the model."""

    def __init__(self, model: nn.Module, backbone: Backbone, *, registry: Registry | None = None,
                 keep_base: bool = True):
        super().__init__()
        if isinstance(model, PeftModel):
            raise PeftmedError("model is already a PeftModel; use its add_adapter()")
        self.base_model = model
        self.prompt_modules = nn.ModuleDict()
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "registry", registry or default_registry())
        object.__setattr__(self, "adapters", {})
        object.__setattr__(self, "_originals", {})
        self.active_adapter: str | None = None
        self.keep_base = keep_base  # keep select-family base values, to switch adapters and disable
        self.generation_length: int | None = None  # answers' length in tokens when a call gives none (a run's)
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_counts = self._count_base()
        # parts of the model whose outputs never reach the loss: no method is placed there (Backbone.unused)
        unused = backbone.unused(model) if backbone.unused is not None else ()
        object.__setattr__(self, "unreachable", tuple(canonical_name(n) for n in unused))

    def __deepcopy__(self, memo):
        """Copy the model and adapters; the registry and backbone description are shared."""
        import copy

        memo[id(self.registry)] = self.registry
        memo[id(self.backbone)] = self.backbone
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        return new

    # ---- delegation ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "prompt_modules"}:
                raise
            return getattr(self.base_model, name)

    # ---- applying ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, recipe: str | Recipe | Mapping, *, activate: bool = True) -> AdapterState:
        """Apply ``recipe`` as a new adapter ``name``; it becomes the active one unless told not to."""
        check_adapter_name(name)
        if name in self.adapters:
            raise RecipeError(
                f"adapter {name!r} already exists on this model; name a new adapter "
                f"(add_adapter('other', recipe)) or remove it first"
            )
        recipe = Recipe.parse(recipe, components=list(self.backbone.components)).canonical(self.registry)
        plan = self._plan(recipe)
        return self._apply_plan(name, recipe, plan, activate=activate)

    def _plan(self, recipe: Recipe, *, lenient: bool = False,
              configs: Mapping[str, list[dict]] | None = None) -> list[tuple[str, Method, MethodConfig, bool]]:
        """Validate everything before touching the model: unknown names and bad options fail here.

        Each step is (component, method, config, from_wildcard); a ``*`` entry skips components the
        method finds nothing to act on (e.g. LayerNorm-tuning on a projector without norms)."""
        plan = []
        resolved = recipe.trained(self.backbone.components, self.registry)
        for component, calls in resolved.items():
            families = {}
            from_wildcard = component not in recipe.entries
            for i, call in enumerate(calls):
                method = self.registry.method(call.name)
                options = call.options
                if configs is not None and component in configs:
                    options = configs[component][i]
                config = method.make_config(options, lenient=lenient)
                if method.family == "prompt" and "prompt" in families:
                    raise RecipeError(
                        f"component {component!r} gets two prompt-family methods ({families['prompt']} "
                        f"and {method.name}); a component takes at most one"
                    )
                families.setdefault(method.family, method.name)
                plan.append((component, method, config, from_wildcard))
        if not plan:
            raise RecipeError(f"recipe {recipe.to_text()!r} trains nothing (every component is frozen)")
        return plan

    def _apply_plan(self, name: str, recipe: Recipe, plan, *, activate: bool) -> AdapterState:
        previous = self.active_adapter
        if previous is not None:
            self._deactivate(previous)
        state = AdapterState(name, recipe)
        self.adapters[name] = state
        try:
            for component, method, config, from_wildcard in plan:
                ctx = ApplyContext(self.base_model, self.backbone, component, method, config, name,
                                   registry=self.registry, unreachable=self.unreachable)
                try:
                    state.applied.append(self._apply_one(ctx))
                    state.applied[-1].skipped = dict(ctx.skipped)
                except NoMatchError as exc:
                    if not from_wildcard:
                        raise
                    state.skipped.append(f"{component}: {exc}")
                    log.info("recipe %r: skipping component %r: %s", recipe.to_text(), component, exc)
            if not state.applied:
                raise NoMatchError(
                    f"recipe {recipe.to_text()!r} matches nothing on backbone {self.backbone.name!r}: "
                    + "; ".join(state.skipped)
                )
        except Exception:
            self.remove_adapter(name, _rollback=True)
            if previous is not None:
                self._activate(previous)
            raise
        if activate:
            self._activate(name)
        else:
            self._deactivate(name)
            if previous is not None:
                self._activate(previous)
        return state

    def _apply_one(self, ctx: ApplyContext) -> AppliedMethod:
        method = ctx.method
        applied = AppliedMethod(ctx.component, method, ctx.config)
        if method.family == "inject":
            for mod_name, (module, role) in ctx.matched().items():
                layer_class = method.layer_class_for(unwrap(module))
                layer = self._find_layer(mod_name, layer_class)
                if layer is None:
                    try:
                        layer = layer_class(self.base_model.get_submodule(mod_name))
                    except RecipeError as exc:
                        raise RecipeError(f"method {method.name!r} cannot wrap {mod_name!r}: {exc}") from None
                    self.base_model.set_submodule(mod_name, layer)
                object.__setattr__(layer, "kernel_registry", self.registry)
                if ctx.adapter_name in layer.configs:
                    raise RecipeError(f"method {method.name!r} applied twice to {mod_name!r} in one adapter")
                layer.add_adapter(ctx.adapter_name, ctx.config, role)
                layer.set_active(ctx.adapter_name)
                applied.layers[mod_name] = layer
            applied.params = dict(method.extra_parameters(ctx, applied.layers))
        elif method.family == "select":
            applied.params = dict(method.select(ctx))
            if not applied.params:
                raise NoMatchError(
                    f"method {method.name!r} on component {ctx.component!r} selects no parameter"
                )
        elif method.family == "prompt":
            module = method.attach(ctx)
            if not isinstance(module, PromptModule):
                raise PeftmedError(f"method {method.name!r}.attach must return a PromptModule, got {module!r}")
            key = f"{ctx.adapter_name}__{ctx.component}__{method.name}".replace(".", "_")
            self.prompt_modules[key] = module
            applied.prompt_key = key
        else:  # Method.__init__ validates the family; a plugin bypassing it gets a clear error
            raise PeftmedError(f"method {method.name!r} has unknown family {method.family!r}")
        if self.keep_base:
            for pname, p in applied.params.items():
                if not p.is_meta:  # a meta-device model (e.g. recipe check) holds no values to keep
                    self._originals.setdefault(pname, p.detach().to("cpu", copy=True))
        return applied

    def _find_layer(self, name: str, layer_class) -> AdapterLayer | None:
        module = self.base_model.get_submodule(name)
        while isinstance(module, AdapterLayer):
            if type(module) is layer_class:
                return module
            module = module.base_layer
        return None

    # ---- adapters ---------------------------------------------------------------------------------
    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``None``: the base model alone)."""
        if name is not None and name not in self.adapters:
            raise UnknownNameError("adapter", name, self.adapters)
        if name == self.active_adapter:
            return
        if self.active_adapter is not None:
            self._deactivate(self.active_adapter)
        if name is not None:
            self._activate(name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        active = self.active_adapter
        self.set_adapter(None)
        try:
            yield
        finally:
            self.set_adapter(active)

    def _select_params(self, name: str) -> dict[str, nn.Parameter]:
        return {k: p for a in self.adapters[name].applied for k, p in a.params.items()}

    def _deactivate(self, name: str) -> None:
        state = self.adapters[name]
        selected = self._select_params(name)
        if selected:
            if not self.keep_base:
                raise PeftmedError(
                    f"adapter {name!r} trains base parameters and this PeftModel was made with "
                    f"keep_base=False, so the base values to switch back to were not kept"
                )
            state.saved_values = {k: p.detach().to("cpu", copy=True) for k, p in selected.items()}
            with torch.no_grad():
                for k, p in selected.items():
                    p.copy_(self._originals[k])
        self._set_layers_active(None)
        self.active_adapter = None
        self._refresh_trainable()

    def _activate(self, name: str) -> None:
        state = self.adapters[name]
        if state.saved_values is not None:
            with torch.no_grad():
                for k, p in self._select_params(name).items():
                    p.copy_(state.saved_values[k])
            state.saved_values = None
        self._set_layers_active(name)
        self.active_adapter = name
        self._refresh_trainable()

    def _set_layers_active(self, name: str | None) -> None:
        for module in self.base_model.modules():
            if isinstance(module, AdapterLayer):
                module.set_active(name)
        for key, module in self.prompt_modules.items():
            module.set_active(name is not None and key.startswith(f"{name}__"))

    def _refresh_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        if self.active_adapter is not None:
            for p in self.adapter_tensors(self.active_adapter).values():
                p.requires_grad_(True)

    def remove_adapter(self, name: str, *, _rollback: bool = False) -> None:
        if name not in self.adapters:
            raise UnknownNameError("adapter", name, self.adapters)
        if self.active_adapter == name and not _rollback:
            self._deactivate(name)
        state = self.adapters.pop(name)
        for applied in state.applied:
            for mod_name, layer in applied.layers.items():
                layer.remove_adapter(name)
                if not layer.adapters:
                    self._unwrap_layer(mod_name, layer)
            if applied.prompt_key is not None:
                self.prompt_modules[applied.prompt_key].detach()
                del self.prompt_modules[applied.prompt_key]
        if _rollback:
            with torch.no_grad():
                for k, p in {k: p for a in state.applied for k, p in a.params.items()}.items():
                    if k in self._originals:
                        p.copy_(self._originals[k])
        if self.active_adapter == name:
            self.active_adapter = None
        self._refresh_trainable()

    def _unwrap_layer(self, mod_name: str, layer: AdapterLayer) -> None:
        """Put ``layer.base_layer`` back where ``layer`` sits (it may be nested in other wrappers)."""
        parent_name = mod_name
        module = self.base_model.get_submodule(mod_name)
        if module is layer:
            self.base_model.set_submodule(mod_name, layer.base_layer)
            return
        while isinstance(module, AdapterLayer):
            if module.base_layer is layer:
                module.base_layer = layer.base_layer
                return
            module = module.base_layer
        raise PeftmedError(f"adapter layer at {parent_name!r} not found for removal")

    # ---- tensors and counts ------------------------------------------------------------------------
    def adapter_tensors(self, name: str | None = None) -> dict[str, nn.Parameter]:
        name = name or self._require_active()
        out: dict[str, nn.Parameter] = {}
        for applied in self.adapters[name].applied:
            for k, p in applied.tensors(self, name).items():
                out.setdefault(k, p)
        return out

    def optimizer_options(self, name: str | None = None, *, lr: float, weight_decay: float,
                          method_lr: bool = False) -> dict[str, dict[str, float]]:
        """Learning rate and weight decay of each adapter tensor (canonical name): the recipe call's ``lr=`` /
        ``weight_decay=``, else the method's ``default_lr`` when ``method_lr``, else ``lr`` / ``weight_decay``;
        ``group`` names the component and method (``decoder.lora``), as the trainable report does."""
        name = name or self._require_active()
        out: dict[str, dict[str, float]] = {}
        for applied in self.adapters[name].applied:
            cfg, method = applied.config, applied.method
            rate = cfg.lr if cfg.lr is not None else (method.default_lr if method_lr and method.default_lr else lr)
            decay = cfg.weight_decay if cfg.weight_decay is not None else weight_decay
            for k in applied.tensors(self, name):
                out.setdefault(k, {"lr": float(rate), "weight_decay": float(decay),
                                   "group": f"{applied.component}.{method.name}"})
        return out

    def _require_active(self) -> str:
        if self.active_adapter is None:
            raise PeftmedError("no active adapter; call set_adapter(name)")
        return self.active_adapter

    def _count_base(self) -> dict[str, int]:
        skip = adapter_parameter_ids(self.base_model)
        counts = {c: 0 for c in self.backbone.components}
        total, seen = 0, set()
        for n, p in self.base_model.named_parameters():
            if id(p) in skip or id(p) in seen:
                continue
            seen.add(id(p))
            size = logical_numel(p)
            total += size
            comp = self.backbone.component_of(canonical_name(n))
            if comp is not None:
                counts[comp] += size
        counts["*"] = total
        return counts

    def trainable_report(self, name: str | None = None, *, lr: float | None = None,
                         weight_decay: float | None = None, method_lr: bool = False) -> TrainableReport:
        """Trainable parameters per component and method, as the papers' tables show them.

        ``lr`` / ``weight_decay``: the run's defaults; each row then shows the rate and decay its tensors
        train with (a recipe call's ``lr=`` / ``weight_decay=`` first, as the optimizer does). Without them,
        a row shows only what its recipe call sets."""
        name = name or self._require_active()
        rows, seen, added = [], set(), 0
        base_ids = {id(p) for p in self.base_model.parameters()} - adapter_parameter_ids(self.base_model)
        for applied in self.adapters[name].applied:
            count = 0
            for p in applied.tensors(self, name).values():
                if id(p) not in seen:
                    seen.add(id(p))
                    count += p.numel()
                    added += 0 if id(p) in base_ids else p.numel()
            cfg, method = applied.config, applied.method
            rate = cfg.lr if cfg.lr is not None else (
                method.default_lr if method_lr and method.default_lr else lr)
            decay = cfg.weight_decay if cfg.weight_decay is not None else weight_decay
            rows.append(ReportRow(applied.component, method.name, cfg.to_dict(), count,
                                  self.base_counts[applied.component], rate, decay,
                                  skipped=sum(applied.skipped.values()), skipped_names=sorted(applied.skipped)))
        return TrainableReport(
            backbone=self.backbone.name, recipe=self.adapters[name].recipe.to_text(),
            row=self.adapters[name].recipe.row(list(self.backbone.components), self.registry),
            rows=rows, total_base=self.base_counts["*"],
            component_totals={c: self.base_counts[c] for c in self.backbone.components}, added=added,
        )

    def num_trainable(self) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    # ---- asking the model -------------------------------------------------------------------------
    def answer(self, image, question: str | None = None, *, task: str = "vqa", num_beams: int = 3,
               max_new_tokens: int | None = None, batch_size: int = 16):
        """The adapted model's answer to ``question`` about ``image`` (a path, a PIL image or a uint8 (3, H, W)
        tensor), prepared as the training data was; lists of images and questions give a list of answers.
        ``task="report"`` writes a report for the image instead (no question)."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if question is None:
            questions = None
        else:
            questions = [question] if isinstance(question, str) else list(question)
        task_obj = self.registry.get("task", task)
        texts, _ = answer_with(task_obj, task_obj.wrap(self), images, questions, batch_size=batch_size,
                           num_beams=num_beams, max_new_tokens=max_new_tokens)
        return texts[0] if single else texts

    # ---- merge ------------------------------------------------------------------------------------
    def _mergeable_layers(self, name: str) -> list[AdapterLayer]:
        state = self.adapters[name]
        for applied in state.applied:
            if applied.method.family == "prompt" and not applied.method.mergeable:
                raise PeftmedError(
                    f"method {applied.method.name!r} ({applied.method.family} family) cannot be merged "
                    f"into the weights"
                )
            if applied.method.family == "inject" and not applied.method.mergeable:
                raise PeftmedError(f"method {applied.method.name!r} cannot be merged into the weights")
        return [layer for a in state.applied for layer in a.layers.values()]

    def merge(self, name: str | None = None) -> None:
        """Fold the active adapter's inject updates into the base weights (select methods already are)."""
        name = name or self._require_active()
        for layer in self._mergeable_layers(name):
            layer.merge(name)

    def unmerge(self, name: str | None = None) -> None:
        name = name or self._require_active()
        for layer in self._mergeable_layers(name):
            layer.unmerge(name)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain model with every adapter layer removed."""
        self.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model with every adapter layer replaced by the module it wraps and every prompt module
        detached, whatever was merged into the weights before (merge first to keep the adapters' effect)."""
        for mod_name, module in list(self.base_model.named_modules()):
            if isinstance(module, AdapterLayer) and ".base_layer" not in mod_name:
                inner = module
                while isinstance(inner, AdapterLayer):
                    inner = inner.base_layer
                self.base_model.set_submodule(mod_name, inner)
        for module in self.prompt_modules.values():
            module.detach()
        return self.base_model

    # ---- save / load ------------------------------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, name: str | None = None, *,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write ``adapter.safetensors`` and ``adapter.json`` (each atomically) into the folder ``path``.

        Other files in the folder are left alone. The manifest records the SHA-256 of the weights file and
        the identity of the model's tokenizer (when it has one), which loading checks. ``tensors``: the
        adapter's values by name when the parameters do not hold them whole (gathered from a sharded run).
        """
        name = name or self._require_active()
        if name != self.active_adapter:
            raise PeftmedError(f"save the active adapter; {name!r} is not active (call set_adapter)")
        state = self.adapters[name]
        own = self.adapter_tensors(name)
        given = dict(tensors or {})
        if set(given) - set(own):
            raise PeftmedError(f"save_adapter(tensors=...) names tensors the adapter does not have: "
                               f"{sorted(set(given) - set(own))[:3]}")
        by_id = {id(own[k]): v for k, v in given.items()}  # a tensor listed under two names was given once
        tensors = {k: given.get(k, by_id.get(id(p), p)).detach().contiguous().cpu() for k, p in own.items()}
        owners = {}
        methods: dict[str, list[dict]] = {}
        tensor_meta: dict[str, dict] = {}
        for applied in state.applied:
            owner = self.registry.owner("method", applied.method.name)
            dist = owner.distribution if owner else "(unregistered)"
            version = owner.version if owner else ""
            if owner is not None and not owner.builtin:
                owners[dist] = version
            methods.setdefault(applied.component, []).append({
                "method": applied.method.name, "method_version": applied.method.version,
                "family": applied.method.family, "plugin": dist, "plugin_version": version,
                "config": applied.config.to_dict(),
            })
            for k, p in applied.tensors(self, name).items():
                tensor_meta.setdefault(k, {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                                           "component": applied.component, "method": applied.method.name})
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "peftmed_version": __version__,
            "torch_version": torch.__version__, "plugins": owners, "backbone": self.backbone.name,
            "adapter_name": name, "recipe": state.recipe.to_text(), "recipe_json": state.recipe.to_dict(),
            "methods": methods, "tensors": tensor_meta, "trainable": sum(t.numel() for t in tensors.values()),
        }
        fingerprint = tokenizer_fingerprint(getattr(self.base_model, "tokenizer", None))
        if fingerprint is not None:
            manifest["tokenizer"] = {"sha256": fingerprint}
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise AdapterError(f"cannot save the adapter to {str(path)!r}: it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        # weights first, then the manifest naming their digest: each file is replaced atomically and
        # nothing else in the folder is touched; a crash between the two leaves a digest mismatch that
        # loading reports, never a silent mix of two adapters
        from safetensors.torch import save as save_bytes

        data = save_bytes(tensors, metadata={"format": FORMAT})
        manifest["weights_sha256"] = hashlib.sha256(data).hexdigest()
        write_bytes_atomic(path / WEIGHTS, data)
        write_json_atomic(path / MANIFEST, manifest)
        return path

    def load_adapter(self, path: str | os.PathLike, name: str | None = None, *, activate: bool = True) -> AdapterState:
        """Apply the recipe saved at ``path`` as adapter ``name`` and load its tensors.

        Every check runs before the model is touched or is rolled back on failure: a manifest
        for another backbone, unknown methods, missing/unexpected tensors, wrong shapes, a
        truncated or corrupt safetensors file.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if manifest["backbone"] != self.backbone.name:
            raise AdapterError(
                f"adapter {str(path)!r} was saved for backbone {manifest['backbone']!r}; this model is "
                f"backbone {self.backbone.name!r}"
            )
        check_tokenizer(manifest, getattr(self.base_model, "tokenizer", None), path)
        tensors = read_tensors(path, manifest)
        name = check_adapter_name(name or manifest.get("adapter_name") or "default")
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} already exists on this model; pass another name")
        try:
            recipe = Recipe.from_dict(manifest["recipe_json"])
            resolved = recipe.trained(self.backbone.components, self.registry)
        except PeftmedError as exc:
            raise AdapterError(f"{path / MANIFEST}: recipe_json cannot be used: {exc}") from None
        methods = manifest["methods"]
        for comp, calls in resolved.items():
            saved = [m["method"] for m in methods.get(comp, [])]
            if [c.name for c in calls] != saved:
                raise AdapterError(f"{path / MANIFEST}: recipe and methods do not agree on component {comp!r} "
                                   f"(recipe {[c.name for c in calls]}, methods {saved})")
        configs = {c: [m.get("config", {}) for m in ms] for c, ms in methods.items()}
        plan = self._plan(recipe, lenient=True, configs=configs)
        state = self._apply_plan(name, recipe, plan, activate=True)
        try:
            own = self.adapter_tensors(name)
            missing = sorted(set(own) - set(tensors))
            unexpected = sorted(set(tensors) - set(own))
            if missing or unexpected:
                raise AdapterError(
                    f"adapter {str(path)!r} does not match this model: "
                    + (f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
                    + (f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
                )
            for k, p in own.items():
                if tuple(tensors[k].shape) != tuple(p.shape):
                    raise AdapterError(
                        f"adapter tensor {k!r} has shape {tuple(tensors[k].shape)} in {str(path)!r} but the "
                        f"model expects {tuple(p.shape)}"
                    )
            with torch.no_grad():
                for k, p in own.items():
                    p.copy_(tensors[k].to(p.dtype))
        except Exception:
            self.remove_adapter(name, _rollback=True)
            raise
        if not activate:
            self.set_adapter(None)
        return state


@dataclass
class ReportRow:
    component: str
    method: str
    config: dict[str, Any]
    trainable: int
    component_total: int
    lr: float | None = None  # the learning rate its tensors train with (None: the run's, not known here)
    weight_decay: float | None = None
    skipped: int = 0  # parameters of the method's roles left out because they cannot receive a gradient
    skipped_names: list[str] = field(default_factory=list)


@dataclass
class TrainableReport:
    backbone: str
    recipe: str
    row: str
    rows: list[ReportRow]
    total_base: int
    component_totals: dict[str, int]
    added: int = 0  # parameters the adapter adds (inject and prompt families) beyond the base model

    @property
    def percent_with_added(self) -> float:
        """trainable / (base + added): how peft's print_trainable_parameters and the MILE paper count."""
        total = self.total_base + self.added
        return 100.0 * self.trainable / total if total else 0.0

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total_base if self.total_base else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone, "recipe": self.recipe, "row": self.row,
            "trainable": self.trainable, "total": self.total_base, "percent": self.percent,
            "added": self.added, "percent_with_added": self.percent_with_added,
            "components": self.component_totals,
            "rows": [
                {"component": r.component, "method": r.method, "config": r.config, "trainable": r.trainable,
                 "component_total": r.component_total, "lr": r.lr, "weight_decay": r.weight_decay,
                 "percent_of_model": 100.0 * r.trainable / self.total_base if self.total_base else 0.0,
                 "skipped_cannot_learn": r.skipped, "skipped_modules": r.skipped_names}
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        rates = any(r.lr is not None or r.weight_decay is not None for r in self.rows)
        lines = [f"backbone {self.backbone}  recipe {self.recipe}  ({self.row})",
                 f"{'component':<10} {'method':<12} {'trainable':>13} {'of component':>13} {'% model':>9}"
                 + (f" {'lr':>9} {'decay':>7}" if rates else "")]
        for r in self.rows:
            pc = 100.0 * r.trainable / r.component_total if r.component_total else 0.0
            pm = 100.0 * r.trainable / self.total_base if self.total_base else 0.0
            extra = f" {_rate(r.lr):>9} {_rate(r.weight_decay):>7}" if rates else ""
            lines.append(f"{r.component:<10} {r.method:<12} {r.trainable:>13,} {pc:>12.3f}% {pm:>8.3f}%{extra}")
        lines.append(f"{'total':<10} {'':<12} {self.trainable:>13,} {'':>13} {self.percent:>8.3f}%"
                     f"   (model: {self.total_base:,} parameters)")
        if self.added:
            lines.append(f"{'':<10} {'':<12} {'':>13} {'':>13} {self.percent_with_added:>8.3f}%"
                         f"   of model + {self.added:,} added (how peft and the MILE paper count)")
        for r in self.rows:
            if r.skipped_names:
                lines.append(f"skipped    {r.method:<12} {r.skipped:,} parameters of {r.component} that cannot learn: "
                             f"{', '.join(r.skipped_names)} feed(s) nothing the loss sees")
        return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "run's" if value is None else f"{value:g}"


def read_manifest(path: Path) -> dict:
    """The adapter manifest of folder ``path``, every field checked for type before anything uses it."""
    mpath = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise AdapterError(f"adapter folder {str(path)!r} does not exist")
    if not mpath.is_file():
        raise AdapterError(f"{str(path)!r} is not a peftmed adapter: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise AdapterError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterError(f"{mpath} is not a peftmed adapter manifest (format is not {FORMAT!r})")
    _check_manifest(manifest, mpath)
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise AdapterError(f"{mpath} was written by peftmed {manifest.get('peftmed_version', '?')} in adapter format "
                           f"{manifest['format_version']}; this peftmed ({__version__}) reads format {FORMAT_VERSION} "
                           f"and older. Upgrade peftmed to load it")
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    key = (str(mpath.resolve()), tuple(unknown))
    if unknown and key not in _WARNED:  # once per file: a command reads a manifest several times
        _WARNED.add(key)
        warnings.warn(f"{mpath} was written by peftmed {manifest.get('peftmed_version', '?')} (this is "
                      f"{__version__}); ignoring unknown keys {unknown}", stacklevel=3)
    return manifest


_WARNED: set[tuple] = set()


def _check_manifest(m: dict, mpath: Path) -> None:
    """Raise AdapterError naming the first field of the manifest that has the wrong type or value."""
    def bad(key: str, value: Any, expected: str) -> AdapterError:
        return AdapterError(f"{mpath}: {key} is {value!r}; expected {expected}")

    for key in ("backbone", "recipe_json", "methods", "tensors"):
        if key not in m:
            raise AdapterError(f"{mpath} lacks the key {key!r}")
    version = m.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("format_version", version, "a positive integer")
    if not isinstance(m["backbone"], str) or not m["backbone"]:
        raise bad("backbone", m["backbone"], "a backbone name")
    if "adapter_name" in m and m["adapter_name"] is not None:
        try:
            check_adapter_name(m["adapter_name"])
        except AdapterError as exc:
            raise AdapterError(f"{mpath}: {exc}") from None
    if not isinstance(m["recipe_json"], dict):
        raise bad("recipe_json", m["recipe_json"], "a mapping of component -> methods")
    if not isinstance(m["methods"], dict):
        raise bad("methods", m["methods"], "a mapping of component -> [{method, config}, ...]")
    for comp, entries in m["methods"].items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("method"), str)
                                                    and isinstance(e.get("config", {}), dict) for e in entries):
            raise bad(f"methods[{comp!r}]", entries, "a list of {method: name, config: {...}}")
    if not isinstance(m["tensors"], dict):
        raise bad("tensors", m["tensors"], "a mapping of tensor name -> {shape, dtype}")
    for name, meta in m["tensors"].items():
        if not isinstance(meta, dict):
            raise bad(f"tensors[{name!r}]", meta, "{shape: [...], dtype: ...}")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensors[{name!r}].shape", shape, "a list of non-negative integers")
        if "dtype" in meta and not (isinstance(meta["dtype"], str) and meta["dtype"] in DTYPES):
            raise bad(f"tensors[{name!r}].dtype", meta["dtype"], f"one of {sorted(DTYPES)}")
    digest = m.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise bad("weights_sha256", digest, "a hex SHA-256 digest")
    tok = m.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("sha256"), str)):
        raise bad("tokenizer", tok, "{sha256: ...}")


def check_tokenizer(manifest: dict, tokenizer: Any, path: Path) -> None:
    """Refuse a model whose tokenizer is not the one the adapter was trained with."""
    recorded = (manifest.get("tokenizer") or {}).get("sha256")
    found = tokenizer_fingerprint(tokenizer)
    if recorded and found and recorded != found:
        raise AdapterError(
            f"adapter {str(path)!r} was trained with another tokenizer (vocabulary sha256 {recorded[:12]}...) than "
            f"this model's ({found[:12]}...): its token ids would mean other words. Rebuild the base model with the "
            f"training run's tokenizer (its tokenizer/ folder; 'peftmed eval' and 'predict' do this from the run folder)")


def read_tensors(path: Path, manifest: dict, *, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked against the manifest: digest, names, shapes, dtypes, finite values."""
    from safetensors.torch import load_file

    wpath = Path(path) / WEIGHTS
    if not wpath.is_file():
        raise AdapterError(f"adapter weights {str(wpath)!r} are missing")
    digest = manifest.get("weights_sha256")
    if digest is not None:
        found = sha256_file(wpath)
        if found != digest:
            raise AdapterError(
                f"adapter weights {str(wpath)!r} do not match the digest in {MANIFEST} (sha256 {found[:12]}... "
                f"instead of {digest[:12]}...): the file was changed or damaged after saving")
    try:
        tensors = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(f"adapter weights {str(wpath)!r} are truncated or corrupt: {exc}") from exc
    listed = manifest["tensors"]
    if set(listed) != set(tensors):
        diff = sorted(set(listed) ^ set(tensors))
        raise AdapterError(f"{wpath} and its manifest list different tensors: {diff[:5]}")
    for k, meta in listed.items():
        t = tensors[k]
        if list(t.shape) != list(meta["shape"]):
            raise AdapterError(
                f"tensor {k!r} in {wpath} has shape {list(t.shape)}; the manifest says {meta['shape']}"
            )
        dtype = str(t.dtype).replace("torch.", "")
        if "dtype" in meta and dtype != meta["dtype"]:
            raise AdapterError(f"tensor {k!r} in {wpath} has dtype {dtype}; the manifest says {meta['dtype']}")
        if dtype not in DTYPES:
            raise AdapterError(f"tensor {k!r} in {wpath} has dtype {dtype}; adapters hold floating-point tensors")
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(f"tensor {k!r} in {wpath} holds {bad} NaN or infinite value(s); refusing to load it "
                               f"(pass allow_nonfinite=True to inspect such an adapter)")
    return tensors


def find_peft_model(model: nn.Module) -> PeftModel | None:
    """The PeftModel ``model`` is or wraps (a task's wrapper such as ReportModel holds one), else None."""
    if isinstance(model, PeftModel):
        return model
    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    return None


def resolve_backbone(model: nn.Module, backbone: Backbone | str | None, registry: Registry) -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    if backbone is None:
        backbone = getattr(model, "peftmed_backbone", None)
        if backbone is None:
            raise PeftmedError(
                f"cannot tell the backbone of this {type(model).__name__}; pass backbone='name' "
                f"(one of {', '.join(registry.names('backbone'))}) or a peftmed.Backbone with your role map"
            )
    return registry.backbone(backbone)


def apply(model: nn.Module, recipe: str | Recipe | Mapping, *, backbone: Backbone | str | None = None,
          adapter_name: str = "default", registry: Registry | None = None, keep_base: bool = True) -> PeftModel:
    """Apply ``recipe`` to ``model``; returns a PeftModel whose active adapter is ``adapter_name``."""
    registry = registry or default_registry()
    if isinstance(model, PeftModel):
        if adapter_name in model.adapters:
            raise RecipeError(
                f"this model already has adapter {adapter_name!r}; to apply a second recipe name a new "
                f"adapter: peftmed.apply(model, recipe, adapter_name='other') or model.add_adapter('other', recipe)"
            )
        model.add_adapter(adapter_name, recipe)
        return model
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise RecipeError("this model already carries adapter layers; apply the recipe to its PeftModel")
    bb = resolve_backbone(model, backbone, registry)
    pm = PeftModel(model, bb, registry=registry, keep_base=keep_base)
    pm.add_adapter(adapter_name, recipe)
    return pm


def load_adapter(model: nn.Module, path: str | os.PathLike, *, backbone: Backbone | str | None = None,
                 adapter_name: str | None = None, registry: Registry | None = None) -> PeftModel:
    """Load a saved adapter onto ``model`` (a plain model or a PeftModel)."""
    registry = registry or default_registry()
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name)
        return model
    manifest = read_manifest(Path(path))
    name = backbone or getattr(model, "peftmed_backbone", None) or manifest["backbone"]
    if isinstance(name, str) and name not in registry.names("backbone"):
        raise AdapterError(
            f"adapter {str(path)!r} was saved for backbone {name!r}, which is not registered: an adapter applied "
            f"with your own peftmed.Backbone(...) needs it again to load (peftmed.load_adapter(model, path, "
            f"backbone=my_backbone)); registered backbones: {', '.join(registry.names('backbone'))}")
    bb = resolve_backbone(model, name, registry)
    pm = PeftModel(model, bb, registry=registry)
    pm.load_adapter(path, adapter_name)
    return pm
