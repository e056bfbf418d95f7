"""Adapters in huggingface/peft's format: export a peftmed adapter, import a peft one.

peft loads an adapter onto a transformers model: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path in the transformers model>.<tensor>``. peftmed's ``hf-*``
backbones hold the transformers model as a submodule of a wrapper, so a peftmed tensor name is that
submodule's attribute name + the same module path. What maps:

  peftmed           peft              tensors (peftmed -> peft)
  lora              LORA              lora_A (r, in) -> lora_A.weight;  lora_B (out, r) -> lora_B.weight
  ia3               IA3               ia3_scale (n,) -> ia3_l, (out, 1), or (1, in) for feed-forward roles
  layernorm         LN_TUNING         <norm>.weight/.bias -> <norm>.ln_tuning_layers.weight/.bias

Refused, with the reason: methods peft has no equivalent for (BitFit, full, FFN-/Attention-tuning,
DoRA and VeRA plugins: peft's DoRA/VeRA differ in parameterisation), prompt methods (peft's prefix
tuning feeds past_key_values to the whole language model, not to one component's attention), LoRA
with bias training (peft does not save base biases as LoRA), several methods in one component, and
models that are not a transformers model inside a peftmed wrapper.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..model import PeftModel, apply, read_manifest, read_tensors
from ..recipe import MethodCall, Recipe

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
SUPPORTED = {"lora": "LORA", "ia3": "IA3", "layernorm": "LN_TUNING"}
PREFIX = "base_model.model."


def import_peft():
    """peft, imported only when an adapter crosses to or from its format or the bench runs its baseline (it takes
    seconds to import, and imports bitsandbytes when that is installed: its import-time warning is silenced)."""
    from ..memory.quantize import quiet_bitsandbytes_import

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


def export_to_peft(adapter: str | Path, out: str | Path, *, registry=None) -> Path:
    """Write ``adapter`` (a peftmed adapter folder) as a peft adapter folder ``out``."""
    from safetensors.torch import save_file

    from ..plugins import default_registry

    peft = import_peft()
    registry = registry or default_registry()
    adapter, out = Path(adapter), Path(out)
    manifest = read_manifest(adapter)
    tensors = read_tensors(adapter, manifest)
    backbone = registry.backbone(manifest["backbone"])
    methods = {(comp, m["method"]): m["config"] for comp, ms in manifest["methods"].items() for m in ms}
    kinds = {name for _, name in methods}
    for comp, ms in manifest["methods"].items():
        if len(ms) > 1:
            raise AdapterError(f"component {comp!r} combines {[m['method'] for m in ms]}; peft takes one method per adapter")
    unsupported = sorted(kinds - set(SUPPORTED))
    if unsupported:
        raise AdapterError(
            f"peft cannot represent method(s) {unsupported} of adapter {str(adapter)!r}; exportable: "
            f"{', '.join(SUPPORTED)} (see peftmed.interop.peft_format for why others are not)"
        )
    if len(kinds) > 1:
        raise AdapterError(f"adapter mixes {sorted(kinds)}; a peft adapter holds one method type")
    kind = kinds.pop()
    with torch.device("meta"):
        model = backbone.build()
    sub = hf_submodule(model, backbone.name)
    out_tensors: dict[str, torch.Tensor] = {}
    if kind == "lora":
        configs = list(methods.values())
        for cfg in configs:
            if cfg.get("bias", "none") != "none":
                raise AdapterError(f"LoRA with bias={cfg['bias']!r} trains base biases, which peft's LoRA format cannot hold")
        modules: dict[str, dict] = {}
        for key, t in tensors.items():
            base, attr = key.rsplit(".", 1)
            cfg = methods[(manifest["tensors"][key]["component"], "lora")]
            modules[_strip(base, sub)] = cfg
            out_tensors[f"{PREFIX}{_strip(base, sub)}.{attr}.weight"] = t
        ranks, alphas = Counter(c["r"] for c in modules.values()), Counter(c["alpha"] for c in modules.values())
        first = configs[0]
        config = peft.LoraConfig(
            r=ranks.most_common(1)[0][0], lora_alpha=alphas.most_common(1)[0][0], target_modules=sorted(modules),
            lora_dropout=first["dropout"], use_rslora=first["rslora"], bias="none",
            rank_pattern={m: c["r"] for m, c in modules.items()}, alpha_pattern={m: c["alpha"] for m, c in modules.items()},
        )
    elif kind == "ia3":
        with torch.device("meta"):
            pm = apply(model, Recipe.from_dict(manifest["recipe_json"]), backbone=backbone, registry=registry, keep_base=False)
        targets, feedforward = [], []
        for key, t in tensors.items():
            base = key.rsplit(".", 1)[0]
            layer = pm.base_model.get_submodule(base)
            name = _strip(base, sub)
            targets.append(name)
            if layer.on_input["default"] if "default" in layer.on_input else next(iter(layer.on_input.values())):
                feedforward.append(name)
                out_tensors[f"{PREFIX}{name}.ia3_l"] = t.reshape(1, -1)
            else:
                out_tensors[f"{PREFIX}{name}.ia3_l"] = t.reshape(-1, 1)
        config = peft.IA3Config(target_modules=sorted(targets), feedforward_modules=sorted(feedforward))
    else:  # layernorm
        targets = set()
        for key, t in tensors.items():
            base, attr = key.rsplit(".", 1)
            targets.add(_strip(base, sub))
            out_tensors[f"{PREFIX}{_strip(base, sub)}.ln_tuning_layers.{attr}"] = t
        config = peft.LNTuningConfig(target_modules=sorted(targets))
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


def peft_targets(spec, name: str) -> bool:
    """Whether peft's ``target_modules`` / ``feedforward_modules`` value selects module ``name``: a string is a
    regular expression matched against the whole name, a list names modules by their last dotted parts."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(patterns, name: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of ``name``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_from_peft(src: str | Path, out: str | Path, *, backbone: str, registry=None) -> Path:
    """Write the peft adapter folder ``src`` as a peftmed adapter ``out`` for ``backbone``."""
    from safetensors.torch import load_file

    from ..plugins import default_registry

    registry = registry or default_registry()
    src = Path(src)
    if not (src / PEFT_CONFIG).is_file() or not (src / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{str(src)!r} is not a peft adapter folder ({PEFT_CONFIG} and {PEFT_WEIGHTS} expected)")
    config = read_peft_config(src / PEFT_CONFIG)
    peft_type = config.get("peft_type")
    method = {v: k for k, v in SUPPORTED.items()}.get(peft_type)
    if method is None:
        raise AdapterError(f"peft adapter type {peft_type!r} has no peftmed equivalent; importable: {', '.join(SUPPORTED.values())}")
    bb = registry.backbone(backbone)
    try:
        weights = load_file(str(src / PEFT_WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{src / PEFT_WEIGHTS} is not a readable safetensors file: {exc}") from exc
    model = bb.build()
    sub = hf_submodule(model, bb.name)
    full = lambda name: f"{sub}.{name}" if sub else name  # noqa: E731
    mine: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for key, t in weights.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"peft tensor {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        if peft_type == "LORA":
            base, attr, _ = name.rsplit(".", 2)
            mine[f"{full(base)}.{attr}"] = t
            modules[full(base)] = {"r": pattern_value(config.get("rank_pattern"), base, config["r"]),
                                   "alpha": pattern_value(config.get("alpha_pattern"), base, config["lora_alpha"])}
        elif peft_type == "IA3":
            base = name.rsplit(".", 1)[0]
            mine[f"{full(base)}.ia3_scale"] = t.reshape(-1)
            modules[full(base)] = {"feedforward": peft_targets(config.get("feedforward_modules"), base)}
        else:
            base, _, attr = name.rsplit(".", 2)
            mine[f"{full(base)}.{attr}"] = t
            modules[full(base)] = {}
    # one recipe entry per component, restricted to exactly these modules by an anchored role pattern
    by_comp: dict[str, list[str]] = {}
    for mod in modules:
        comp = bb.component_of(mod)
        if comp is None:
            raise AdapterError(f"peft module {mod!r} is in no component of backbone {bb.name!r}")
        by_comp.setdefault(comp, []).append(mod)
    entries = {}
    for comp, mods in by_comp.items():
        opts = {}
        if method == "lora":
            rs = {modules[m]["r"] for m in mods}
            alphas = {modules[m]["alpha"] for m in mods}
            if len(rs) > 1 or len(alphas) > 1:
                raise AdapterError(f"component {comp!r} has LoRA modules with different ranks {sorted(rs)}; peftmed uses one per component")
            opts = {"r": rs.pop(), "alpha": float(alphas.pop()), "dropout": float(config.get("lora_dropout", 0.0)),
                    "rslora": bool(config.get("use_rslora", False))}
        entries[comp] = (MethodCall(method, opts),)
    pm = _apply_exact(model, bb, Recipe(entries), {c: set(m) for c, m in by_comp.items()}, method, modules, registry)
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


def _apply_exact(model, bb, recipe: Recipe, mods_by_comp, method, modules, registry) -> PeftModel:
    """Apply ``recipe`` with the backbone's own roles chosen to match exactly the modules peft adapted,
    so the saved adapter loads onto any build of the backbone."""
    entries = {}
    for comp, mods in mods_by_comp.items():
        opts = dict(recipe.entries[comp][0].options)
        opts["roles"] = _roles_covering(model, bb, comp, mods)
        if method == "ia3":
            ff = {m for m in mods if modules[m]["feedforward"]}
            opts["feedforward_roles"] = _roles_covering(model, bb, comp, ff) if ff else ["none"]
        entries[comp] = (MethodCall(method, opts),)
    return apply(model, Recipe(entries), backbone=bb, registry=registry)
