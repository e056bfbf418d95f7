"""Bench suites: named lists of recipes, built in or read from a YAML/TOML/JSON file.

A suite entry is a recipe in any form peftmed reads (``*=layernorm``, ``F|LoRA|LoRA``,
``fusion=lora(r=8) decoder=lora(r=8)``) with an optional short label for tables and plots. The papers'
row form is resolved against the backbone's components when the suite is checked, so one suite runs
on any backbone whose components it names.

Suite file (YAML shown; TOML and JSON hold the same keys)::

    name: my-suite
    recipes:
      - "*=layernorm"
      - {label: lora-r4, recipe: "fusion=lora(r=4) decoder=lora(r=4)"}
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RecipeError, UnknownNameError
from ..options import read_structured_file
from ..recipe import Recipe

FROZEN = "*=frozen"  # the recipe that trains nothing: evaluated as is (the papers' F|F|F)


@dataclass(frozen=True)
class SuiteEntry:
    """One row of a suite: a recipe text and the label shown for it."""

    recipe: str
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.recipe


def _e(recipe: str, label: str = "") -> SuiteEntry:
    return SuiteEntry(recipe, label)


# Recipes are written so every component name they use exists on MISS/BLIP-style backbones
# (vision | fusion | decoder); the row form adapts to the backbone's own component count.
BUILTIN_SUITES: dict[str, tuple[SuiteEntry, ...]] = {
    # What `peftmed bench` runs with no arguments: one row per method family member, sized for a
    # 2-core CPU (see docs/bench.md for the budget).
    "default": (
        _e(FROZEN, "frozen"),
        _e("*=full", "full"),
        _e("*=layernorm", "layernorm"),
        _e("*=bitfit", "bitfit"),
        _e("*=attention", "attention"),
        _e("*=ffn", "ffn"),
        _e("fusion=lora(r=8,alpha=16) decoder=lora(r=8,alpha=16)", "F|LoRA|LoRA r=8"),
        _e("*=ia3", "IA3"),
        _e("fusion=prefix decoder=prefix", "F|Prefix|Prefix"),
    ),
    # The MILE paper's table (MICCAI 2024): rows T|T|T ... on MISS's ViT | JTM | decoder.
    "mile": (
        _e("T|T|T", "T|T|T"),
        _e("F|F|F", "F|F|F"),
        _e("F|LoRA|LoRA", "F|LoRA|LoRA"),
        _e("LoRA|LoRA|LoRA", "LoRA|LoRA|LoRA"),
        _e("T|LoRA|LoRA", "T|LoRA|LoRA"),
        _e("T|T|LoRA", "T|T|LoRA"),
        _e("F|IA3|IA3", "F|IA3|IA3"),
        _e("IA3|IA3|IA3", "IA3|IA3|IA3"),
        _e("T|T|IA3", "T|T|IA3"),
        _e("F|Prefix|Prefix", "F|Prefix|Prefix"),
        _e("T|T|Prefix", "T|T|Prefix"),
        _e("F|PTV2|PTV2", "F|PTV2|PTV2"),
        _e("T|T|PTV2", "T|T|PTV2"),
    ),
    # The LayerNorm paper's comparison (ACM MM 2024).
    "layernorm": (
        _e(FROZEN, "frozen"),
        _e("*=full", "full"),
        _e("*=layernorm", "layernorm"),
        _e("*=ffn", "ffn"),
        _e("*=attention", "attention"),
        _e("*=lora(r=8,alpha=16)", "lora"),
        _e("*=prefix", "prefix"),
    ),
    # The same comparison on medical report generation (the LayerNorm paper's Med-IRG task).
    "irg": (
        _e(FROZEN, "frozen"),
        _e("*=full", "full"),
        _e("*=layernorm", "layernorm"),
        _e("*=ffn", "ffn"),
        _e("*=attention", "attention"),
        _e("*=lora(r=8,alpha=16)", "lora"),
        _e("*=prefix", "prefix"),
    ),
}

# The LayerNorm paper's claim the transfer protocol tests on the source domain (forgetting): the recipes that use
# only the first method, against those that use any of the others (methods by registered name)
FORGETTING_CLAIM = ("layernorm", ("lora", "full"))

# The task each built-in suite compares methods on (its default dataset is the task's, unless --dataset).
SUITE_TASKS = {"default": "vqa", "mile": "vqa", "layernorm": "vqa", "irg": "report"}


def for_backbone(entry: SuiteEntry, components) -> SuiteEntry:
    """A built-in entry written for vision | fusion | decoder, on a backbone without those components: the
    language side (``fusion=... decoder=...``) becomes its ``llm`` (LLaVA, Qwen-VL, Gemma 3...; Mllama keeps its
    cross-attention ``fusion``). The label then names the component, so no row reads as the papers' form."""
    components = list(components)
    if "llm" not in components:
        return entry
    calls = {}
    for part in entry.recipe.split():
        comp, _, method = part.partition("=")
        calls[comp] = method
    if not set(calls) & {"fusion", "decoder"} - set(components):
        return entry
    parts = [f"{c}={m}" for c, m in calls.items() if c not in ("fusion", "decoder") or c in components]
    language = calls.get("decoder") or calls.get("fusion")
    if "llm" not in calls:
        parts.append(f"llm={language}")
    label = (entry.label or entry.recipe).split("|")[-1]
    return SuiteEntry(" ".join(parts), f"llm {label}")


def builtin_suite(name: str) -> tuple[SuiteEntry, ...]:
    if name not in BUILTIN_SUITES:
        raise UnknownNameError("suite", name, BUILTIN_SUITES, hint="Or pass --suite-file FILE / --recipes.")
    return BUILTIN_SUITES[name]


def read_suite_file(path: str | Path) -> tuple[SuiteEntry, ...]:
    """Read a suite from YAML (.yaml/.yml), TOML (.toml) or JSON (.json)."""
    path = Path(path)
    data = read_structured_file(path, "suite file")
    if isinstance(data, dict):
        data = data.get("recipes")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"suite file {str(path)!r} must hold a non-empty list 'recipes'")
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            entries.append(SuiteEntry(item))
        elif isinstance(item, dict) and isinstance(item.get("recipe"), str):
            extra = set(item) - {"recipe", "label"}
            if extra:
                raise ConfigError(f"suite file {str(path)!r}, recipe {i}: unknown keys {sorted(extra)}")
            entries.append(SuiteEntry(item["recipe"], str(item.get("label") or "")))
        else:
            raise ConfigError(
                f"suite file {str(path)!r}, recipe {i}: expected a recipe text or "
                f"{{recipe: ..., label: ...}}, got {item!r}"
            )
    return tuple(entries)


def check_suite(entries, backbone, registry) -> list[SuiteEntry]:
    """Parse every recipe and check every method name before anything is trained.

    Returns the entries with duplicate labels refused; raises with the offending recipe named.
    Whether a component can take a method (roles present, attention that accepts prefixes) is only
    known once a model exists; that is checked per row at run time and recorded as the row's failure.
    """
    seen: dict[str, str] = {}
    out = []
    for entry in entries:
        if entry.name in seen:
            raise ConfigError(f"two recipes in the suite share the label {entry.name!r}; give them distinct labels")
        seen[entry.name] = entry.recipe
        try:
            recipe = Recipe.parse(entry.recipe, components=list(backbone.components))
            for calls in recipe.trained(backbone.components, registry).values():
                for call in calls:
                    registry.method(call.name).make_config(call.options)
        except (RecipeError, UnknownNameError, ConfigError) as exc:
            raise RecipeError(f"suite recipe {entry.name!r}: {exc}") from exc
        out.append(entry)
    return out


_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def recipe_methods(recipe: str) -> set[str]:
    """The method names a recipe text uses (as written; aliases are the registry's to resolve)."""
    try:
        return {call.name for calls in Recipe.parse(recipe).entries.values() for call in calls}
    except RecipeError:
        return set()


def slug(label: str) -> str:
    """A file-name-safe form of a label, unique by construction: a readable stem (at most 60 characters)
    and the first 8 hex digits of the SHA-256 of the whole label (``x/y`` and ``x_y``, or two labels that share
    their first 60 characters, get different names). Results are written per recipe under it."""
    text = _SAFE.sub("_", label.replace("*", "all").replace("|", "-")).strip("_.")
    return f"{text[:60] or 'recipe'}-{hashlib.sha256(label.encode('utf-8')).hexdigest()[:8]}"
