"""Adapters in huggingface/peft's format: export a peftmed adapter, import a peft one.

peft loads an adapter onto a transformers model: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path in the transformers model>.<tensor>``. peftmed's ``hf-*``
backbones hold the transformers model as a submodule of a wrapper, so a peftmed tensor name is that
submodule's attribute name + the same module path. What a method is in peft's format is the method's own
declaration (``Method.peft``, a ``PeftForm``: peft type, tensor names and layouts, config fields), so a plugin
method that declares one exports and imports as the built-ins do. The built-ins:

  peftmed           peft              tensors (peftmed -> peft)
  lora              LORA              lora_A (r, in) -> lora_A.weight;  lora_B (out, r) -> lora_B.weight
  ia3               IA3               ia3_scale (n,) -> ia3_l, (out, 1), or (1, in) for feed-forward roles
  layernorm         LN_TUNING         <norm>.weight/.bias -> <norm>.ln_tuning_layers.weight/.bias

A plugin's form is found the same way: the DoRA plugin's is LORA with ``use_dora`` (``PeftForm.selects`` tells forms
of one peft type apart on import).

Refused, with the reason: methods that declare no peft form (BitFit, full, FFN-/Attention-tuning; the VeRA plugin:
peft's VeRA differs in parameterisation), prompt methods (peft's prefix tuning feeds
past_key_values to the whole language model, not to one component's attention), LoRA with bias training (peft
does not save base biases as LoRA), several methods in one component, and models that are not a transformers
model inside a peftmed wrapper.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from ..memory.quantize import quiet_bitsandbytes_import
from ..methods.base import PeftForm
from ..files import check_output_path
from ..model import MANIFEST, WEIGHTS, PeftModel, apply, read_manifest, read_tensors
from ..plugins import default_registry
from ..recipe import MethodCall, Recipe

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def import_peft():
    """peft, imported only when an adapter crosses to or from its format or the bench runs its baseline (it takes
    seconds to import, and imports bitsandbytes when that is installed: its import-time warning is silenced)."""
    with quiet_bitsandbytes_import():
        try:
            import peft
        except ImportError as exc:  # peft is optional (extra 'baseline')
            raise AdapterError("this needs the peft package: pip install peft") from exc
    return peft



def hf_submodule(model: nn.Module, backbone_name: str) -> str:
    """The attribute of the wrapper that holds the transformers model; refuse other models."""
    from transformers import PreTrainedModel

    for name, child in model.named_children():
        if isinstance(child, PreTrainedModel):
            return name
    if isinstance(model, PreTrainedModel):
        return ""
    raise AdapterError(
        f"backbone {backbone_name!r} is not a transformers model (it builds a {type(model).__name__}); peft "
        f"loads adapters only onto transformers models, so this adapter cannot be exported. Use a hf-* backbone."
    )


def _strip(name: str, sub: str) -> str:
    return name[len(sub) + 1:] if sub else name


def peft_forms(registry) -> dict[str, list[tuple[str, PeftForm]]]:
    """peft type -> [(method name, its form)], over every registered method (plugins' too) that declares one."""
    out: dict[str, list[tuple[str, PeftForm]]] = {}
    for method in registry.all("method").values():
        form = getattr(method, "peft", None)
        if form is not None and form.adapter:
            out.setdefault(form.peft_type, []).append((method.name, form))
    return out


def form_for(config: dict, registry) -> tuple[str, PeftForm]:
    """The registered method whose peft form a peft ``adapter_config.json`` is (its type, and its ``selects``)."""
    peft_type = config.get("peft_type")
    forms = peft_forms(registry)
    if peft_type not in forms:
        raise AdapterError(f"peft adapter type {peft_type!r} has no peftmed equivalent; importable: {', '.join(forms)}")
    found = [(method, form) for method, form in forms[peft_type] if form.selected_by(config)]
    if not found:
        flags = sorted({k for _, f in forms[peft_type] for k in f.selects if config.get(k, False)})
        raise AdapterError(
            f"peft {peft_type} adapter with {', '.join(f'{k}={config[k]!r}' for k in flags) or 'these settings'} has no "
            f"peftmed equivalent among the installed methods ({', '.join(m for m, _ in forms[peft_type])}); a method "
            f"plugin may add it")
    return max(found, key=lambda pair: len(pair[1].selects))


def check_out(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse, before any work, an output folder that cannot be written or that already holds a file of ``names``
    (an adapter there would be replaced) unless ``overwrite``; then exactly those files are replaced and nothing
    else in the folder is touched."""
    check_output_path(out, flag="OUT")
    held = [name for name in names if (out / name).exists()]
    if held and not overwrite:
        raise AdapterError(f"OUT folder {str(out)!r} already holds {', '.join(held)}; pass --overwrite to replace "
                           f"{'it' if len(held) == 1 else 'them'} (nothing else in the folder is touched), or choose "
                           f"another folder")


def export_to_peft(adapter: str | Path, out: str | Path, *, registry=None, overwrite: bool = False) -> Path:
    """Write ``adapter`` (a peftmed adapter folder) as a peft adapter folder ``out``; what a method is in peft's
    format is the method's own declaration (``Method.peft``). A folder that already holds a peft adapter is refused
    unless ``overwrite``."""
    from safetensors.torch import save_file


    adapter, out = Path(adapter), Path(out)
    check_out(out, (PEFT_CONFIG, PEFT_WEIGHTS), overwrite)
    peft = import_peft()
    registry = registry or default_registry()
    manifest = read_manifest(adapter)
    tensors = read_tensors(adapter, manifest)
    backbone = registry.backbone(manifest["backbone"])
    methods = {(comp, m["method"]): m["config"] for comp, ms in manifest["methods"].items() for m in ms}
    kinds = {name for _, name in methods}
    for comp, ms in manifest["methods"].items():
        if len(ms) > 1:
            raise AdapterError(f"component {comp!r} combines {[m['method'] for m in ms]}; peft takes one method per adapter")
    forms = {kind: registry.method(kind).peft for kind in kinds}
    unsupported = sorted(k for k, f in forms.items() if f is None or not f.adapter)
    if unsupported:
        why = "; ".join(f"{k}: {forms[k].refusal}" for k in unsupported if forms[k] is not None)
        exportable = sorted(name for forms_of_type in peft_forms(registry).values() for name, _ in forms_of_type)
        raise AdapterError(
            f"peft cannot represent method(s) {unsupported} of adapter {str(adapter)!r}{f' ({why})' if why else ''}; "
            f"exportable: {', '.join(exportable)} (the methods that declare a peft form)"
        )
    if len(kinds) > 1:
        raise AdapterError(f"adapter mixes {sorted(kinds)}; a peft adapter holds one method type")
    kind = kinds.pop()
    form = forms[kind]
    with torch.device("meta"):
        model = backbone.build()
    sub = hf_submodule(model, backbone.name)
    with torch.device("meta"):
        pm = apply(model, Recipe.from_dict(manifest["recipe_json"]), backbone=backbone, registry=registry,
                   keep_base=False)
    configs: dict[str, dict] = {}
    info: dict[str, dict] = {}
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        base, attr = key.rsplit(".", 1)
        if attr not in form.tensors:
            raise AdapterError(f"tensor {key!r}: peft's {form.peft_type} format has no place for a {attr!r} tensor "
                               f"(what {kind} trains beside its adapter); it holds {sorted(form.tensors)}")
        name = _strip(base, sub)
        configs[name] = methods[(manifest["tensors"][key]["component"], kind)]
        by_module.setdefault(name, []).append((attr, t))
        if name not in info:
            info[name] = form.info(pm.base_model.get_submodule(base), configs[name], None, name)
    try:
        fields = form.fields(configs, info)
    except ConfigError as exc:
        raise AdapterError(str(exc)) from None
    out_tensors = {f"{PREFIX}{name}.{form.tensors[attr]}": form.to_peft(attr, t, info[name])
                   for name, items in by_module.items() for attr, t in items}
    config = peft.get_peft_config({"peft_type": form.peft_type, "target_modules": sorted(by_module), **fields})
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in out_tensors.items()}, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return out


def read_peft_config(path: Path) -> dict:
    """peft's adapter_config.json, every field peftmed reads checked for type (an AdapterError names it)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")

    def bad(key, expected):
        return AdapterError(f"{path}: {key} is {config.get(key)!r}; expected {expected}")

    number = (int, float)
    if config.get("peft_type") == "LORA":
        r = config.get("r")
        if "r" not in config or isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise bad("r", "a positive integer (the LoRA rank)")
        alpha = config.get("lora_alpha")
        if "lora_alpha" not in config or isinstance(alpha, bool) or not isinstance(alpha, number) or \
                not math.isfinite(alpha) or alpha <= 0:
            raise bad("lora_alpha", "a positive number")
        for key, kind, what in (("rank_pattern", int, "positive integers"), ("alpha_pattern", number, "positive numbers")):
            value = config.get(key)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, kind)
                                                      and not isinstance(v, bool) and v > 0 for k, v in value.items()):
                raise bad(key, f"a mapping of module pattern -> {what}")
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise AdapterError(f"{path}: {key} key {pattern!r} is not a valid regular expression: {exc}") from None
        dropout = config.get("lora_dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, number) or not 0 <= dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
    for key in ("target_modules", "feedforward_modules"):
        value = config.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad(key, "a list of module names or a regular expression")
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise AdapterError(f"{path}: {key} {value!r} is not a valid regular expression: {exc}") from None
    return config


def import_from_peft(src: str | Path, out: str | Path, *, backbone: str, registry=None, overwrite: bool = False) -> Path:
    """Write the peft adapter folder ``src`` as a peftmed adapter ``out`` for ``backbone``: the method is the
    registered one whose peft form the folder's config is (``form_for``)."""
    from safetensors.torch import load_file


    registry = registry or default_registry()
    src = Path(src)
    check_out(Path(out), (MANIFEST, WEIGHTS), overwrite)
    if not (src / PEFT_CONFIG).is_file() or not (src / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{str(src)!r} is not a peft adapter folder ({PEFT_CONFIG} and {PEFT_WEIGHTS} expected)")
    config = read_peft_config(src / PEFT_CONFIG)
    peft_type = config.get("peft_type")
    method, form = form_for(config, registry)
    bb = registry.backbone(backbone)
    try:
        weights = load_file(str(src / PEFT_WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{src / PEFT_WEIGHTS} is not a readable safetensors file: {exc}") from exc
    model = bb.build()
    sub = hf_submodule(model, bb.name)
    full = lambda name: f"{sub}.{name}" if sub else name  # noqa: E731
    attributes = {suffix: attr for attr, suffix in form.tensors.items()}
    mine: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for key, t in weights.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"peft tensor {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        suffix = next((s for s in attributes if name.endswith("." + s)), None)
        if suffix is None:
            raise AdapterError(f"peft tensor {key!r} is none of a {peft_type} adapter's ({', '.join(attributes)})")
        base = name[:-len(suffix) - 1]
        if base not in modules:
            modules[base] = form.info(None, None, config, base)
        mine[f"{full(base)}.{attributes[suffix]}"] = form.from_peft(attributes[suffix], t, modules[base])
    modules = {full(base): i for base, i in modules.items()}
    # one recipe entry per component, restricted to exactly these modules by an anchored role pattern
    by_comp: dict[str, list[str]] = {}
    for mod in modules:
        comp = bb.component_of(mod)
        if comp is None:
            raise AdapterError(f"peft module {mod!r} is in no component of backbone {bb.name!r}")
        by_comp.setdefault(comp, []).append(mod)
    entries = {}
    for comp, mods in by_comp.items():
        try:
            opts = form.options(config, [modules[m] for m in mods])
        except ConfigError as exc:
            raise AdapterError(f"component {comp!r}: {exc}") from None
        entries[comp] = (MethodCall(method, opts),)
    pm = _apply_exact(model, bb, Recipe(entries), {c: set(m) for c, m in by_comp.items()}, form, modules, registry)
    own = pm.adapter_tensors()
    missing, unexpected = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if missing or unexpected:
        raise AdapterError(f"peft adapter does not match backbone {bb.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(p.shape) != tuple(mine[k].shape):
                raise AdapterError(f"tensor {k!r}: peft has shape {tuple(mine[k].shape)}, the model expects {tuple(p.shape)}")
            p.copy_(mine[k])
    return pm.save_adapter(out)


def _roles_covering(model, bb, comp: str, mods: set[str]) -> list[str]:
    """Roles of ``bb`` whose matches in ``comp`` lie within ``mods`` and together cover them exactly."""
    chosen, covered = [], set()
    for role in bb.declared_roles(comp):
        hits = set(bb.match(model, comp, role))
        if hits and hits <= mods:
            chosen.append(role)
            covered |= hits
    if covered != mods:
        raise AdapterError(
            f"the peft adapter targets modules of component {comp!r} that no set of roles of backbone "
            f"{bb.name!r} selects exactly (not covered: {sorted(mods - covered)[:3]})"
        )
    return chosen


def _apply_exact(model, bb, recipe: Recipe, mods_by_comp, form: PeftForm, modules, registry) -> PeftModel:
    """Apply ``recipe`` with the backbone's own roles chosen to match exactly the modules peft adapted,
    so the saved adapter loads onto any build of the backbone."""
    entries = {}
    for comp, mods in mods_by_comp.items():
        call = recipe.entries[comp][0]
        opts = dict(call.options)
        opts["roles"] = _roles_covering(model, bb, comp, mods)
        for option, fact in form.role_subsets.items():  # e.g. IA3's feed-forward roles
            subset = {m for m in mods if modules[m][fact]}
            opts[option] = _roles_covering(model, bb, comp, subset) if subset else ["none"]
        entries[comp] = (MethodCall(call.name, opts),)
    return apply(model, Recipe(entries), backbone=bb, registry=registry)
