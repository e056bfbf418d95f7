"""Built-in sub-commands: methods, backbones, plugins, recipe check."""

from __future__ import annotations

import argparse
import json

from ..data import load_records
from ..hookspecs import hookimpl
from ..model import apply
from ..options import parse_key_values
from ..plugins import default_registry
from ..recipe import Recipe
from ..roles import ROLES
from ..tasks import build_options, resolve_task
from . import Command, str2bool, table


def _registry():
    return default_registry()


def _owner_label(registry, kind, name) -> str:
    info = registry.owner(kind, name)
    if info is None:
        return "?"
    return "built-in" if info.builtin else f"{info.distribution} {info.version}"


# ---- methods ----------------------------------------------------------------------------------------
def _methods_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _methods_run(args) -> int:
    import dataclasses

    reg = _registry()
    rows, data = [], []
    for name in reg.names("method"):
        m = reg.method(name)
        opts = [f.name for f in dataclasses.fields(m.config_class)]
        rows.append([name, m.family, ",".join(m.default_roles) or "-", _owner_label(reg, "method", name), m.description])
        data.append({"name": name, "family": m.family, "default_roles": list(m.default_roles), "options": opts,
                     "plugin": _owner_label(reg, "method", name), "description": m.description})
    print(json.dumps(data, indent=2) if args.json else table(rows, ["method", "family", "default roles", "from", "description"]))
    return 0


# ---- backbones ---------------------------------------------------------------------------------------
def _backbones_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roles", metavar="BACKBONE",
                   help="list what each role of BACKBONE's role map matches, per component (built on the meta "
                        "device: no memory, no weights)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _roles_run(reg, name: str, as_json: bool) -> int:
    import torch


    bb = reg.backbone(name)
    with torch.device("meta"):
        model = bb.build()
    rows, data = [], {}
    for comp in bb.components:
        data[comp] = {}
        for role in bb.declared_roles(comp):
            hits = sorted(bb.match(model, comp, role))
            if hits:
                data[comp][role] = hits
                shown = ", ".join(hits[:2]) + (f" ... ({len(hits)} modules)" if len(hits) > 2 else "")
                rows.append([comp, role, ROLES.get(role, "(backbone's own role)"), shown])
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(f"backbone {bb.name}: components {', '.join(f'{c}={p}' for c, p in bb.components.items())}\n"
              f"A role pattern is a regular expression searched in a module's dotted name relative to its component "
              f"root (or a callable (name, module) -> bool); norm and embed are inferred when not declared.\n")
        print(table(rows, ["component", "role", "meaning", "matches"]))
    return 0


def _backbones_run(args) -> int:
    reg = _registry()
    if args.roles:
        return _roles_run(reg, args.roles, args.json)
    rows, data = [], []
    for name in reg.names("backbone"):
        b = reg.backbone(name)
        rows.append([name, "|".join(b.components), ",".join(b.tasks) or "-", _owner_label(reg, "backbone", name),
                     b.description])
        if args.json:  # module paths: a generic backbone finds them by building its model (on the meta device)
            data.append({"name": name, "components": dict(b.components), "tasks": list(b.tasks),
                         "plugin": _owner_label(reg, "backbone", name), "description": b.description})
    print(json.dumps(data, indent=2) if args.json else table(rows, ["backbone", "components", "tasks", "from",
                                                                      "description"]))
    return 0


def _tasks_run(args) -> int:
    reg = _registry()
    rows = []
    for name in reg.names("task"):
        t = reg.get("task", name)
        datasets = sorted(d for d, spec in reg.all("dataset").items() if getattr(spec, "task", "vqa") == name)
        rows.append([name, t.metric, ", ".join(c.header for c in t.columns), ", ".join(datasets) or "-",
                     _owner_label(reg, "task", name), t.description])
    print(table(rows, ["task", "metric", "scores", "datasets", "from", "description"]))
    return 0


# ---- plugins -----------------------------------------------------------------------------------------
def _plugins_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also list the built-in plugins")
    p.add_argument("--json", action="store_true", help="print JSON")


def _plugins_run(args) -> int:
    reg = _registry()
    shown = [p for p in reg.plugins if args.all or not p.builtin]
    if args.json:
        print(json.dumps([{"name": p.name, "distribution": p.distribution, "version": p.version,
                           "builtin": p.builtin, "hooks": p.hooks, "registered": p.registered,
                           "status": "ok" if p.ok else "failed", "error": p.error} for p in shown], indent=2))
        return 0
    if not shown:
        print("no third-party plugins installed (use --all to list the built-in ones)")
        return 0
    rows = []
    for p in shown:
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.registered.items())
        status = "ok" if p.ok else f"FAILED: {p.error}"
        rows.append([p.name, p.distribution, p.version, ",".join(p.hooks) or "-", what or "-", status])
    print(table(rows, ["plugin", "distribution", "version", "hooks", "registers", "status"]))
    return 0


# ---- recipe check ------------------------------------------------------------------------------------
def _recipe_configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="show what a recipe touches on a backbone and how much it trains",
                       description="Apply RECIPE to a freshly built BACKBONE and print, per component and "
                                   "method, the modules touched and the trainable parameters (count and %).")
    c.add_argument("recipe", help="e.g. 'vision=full fusion=lora(r=8,alpha=16)', '*=layernorm' or 'T|LoRA|LoRA'")
    c.add_argument("--backbone", "-b", required=True, help="a registered backbone (see 'peftmed backbones')")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--modules", action="store_true", help="list every module/parameter touched")
    c.add_argument("--meta", nargs="?", const=True, type=str2bool, default=True, metavar="BOOL",
                   help="build on the meta device (no memory; default true; --meta false builds real weights)")
    c.add_argument("--dataset", help="build the model as 'peftmed train' does on this dataset (a backbone that "
                                     "trains its vocabulary on the data then has the run's embedding size)")
    c.add_argument("--data-dir", help="the dataset's folder (vqa-rad, slake)")
    c.add_argument("--backbone-options", action="append", default=[], metavar="KEY=VALUE",
                   help="a builder option (repeatable), as in 'peftmed train'")


def _recipe_run(args) -> int:
    import torch



    reg = _registry()
    bb = reg.backbone(args.backbone)
    recipe = Recipe.parse(args.recipe, components=list(bb.components)).canonical(reg)
    options = parse_key_values(args.backbone_options, "--backbone-options")
    note = ""
    if args.dataset:
        spec = reg.get("dataset", args.dataset)
        task = resolve_task(reg, None, spec)
        options = build_options(task, bb, options)
        records = load_records(spec.name, spec.splits[0], data_dir=args.data_dir, registry=reg)
        if "texts" in _builder_parameters(bb):
            options["texts"] = task.texts(records)
            note = f"vocabulary trained on {spec.name}/{spec.splits[0]}, as 'peftmed train --dataset {spec.name}' builds it"
    ctx = torch.device("meta") if args.meta else torch.device("cpu")
    with ctx:
        model = bb.build(**options)
    if not args.dataset and "texts" in _builder_parameters(bb) and _vocabulary_sized(bb, options, model):
        note = ("vocabulary: the backbone's built-in corpus; a run trains its own on the dataset, so the embedding "
                "rows (and the total) differ: pass --dataset NAME for the run's counts")
    pm = apply(model, recipe, backbone=bb, registry=reg, keep_base=False)
    report = pm.trainable_report()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report)
    if note:
        print(f"({note})")
    if args.modules:
        for k, p in pm.adapter_tensors().items():
            print(f"  {k}  {tuple(p.shape)}")
    return 0


def _vocabulary_sized(backbone, options: dict, model) -> bool:
    """Whether the model's size follows the vocabulary it is built with (trained on the data)."""
    import torch

    with torch.device("meta"):
        other = backbone.build(**{**options, "texts": ["an entirely different vocabulary"]})
    return sum(p.numel() for p in other.parameters()) != sum(p.numel() for p in model.parameters())


def _builder_parameters(backbone) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(backbone.builder).parameters) if backbone.builder else set()
    except (TypeError, ValueError):
        return set()


@hookimpl
def register_commands(register):
    register(Command("methods", "list the registered fine-tuning methods", _methods_configure, _methods_run))
    register(Command("backbones", "list the registered backbones ('--roles NAME': what its role map matches)",
                     _backbones_configure, _backbones_run))
    register(Command("tasks", "list the registered tasks with their metric, scores and datasets", lambda p: None,
                     _tasks_run))
    register(Command("plugins", "list installed plugins with versions, hooks and status", _plugins_configure, _plugins_run))
    register(Command("recipe", "work with recipes ('peftmed recipe check RECIPE --backbone B')", _recipe_configure, _recipe_run))
