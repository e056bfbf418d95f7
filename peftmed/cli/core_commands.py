"""Built-in sub-commands: methods, backbones, plugins, recipe check."""

from __future__ import annotations

import argparse
import json

from ..hookspecs import hookimpl
from . import Command, str2bool


def _registry():
    from ..plugins import default_registry

    return default_registry()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


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
    print(json.dumps(data, indent=2) if args.json else _table(rows, ["method", "family", "default roles", "from", "description"]))
    return 0


# ---- backbones ---------------------------------------------------------------------------------------
def _backbones_run(args) -> int:
    reg = _registry()
    rows = []
    for name in reg.names("backbone"):
        b = reg.backbone(name)
        rows.append([name, "|".join(b.components), ",".join(b.tasks) or "-", _owner_label(reg, "backbone", name), b.description])
    print(_table(rows, ["backbone", "components", "tasks", "from", "description"]))
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
    print(_table(rows, ["plugin", "distribution", "version", "hooks", "registers", "status"]))
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


def _recipe_run(args) -> int:
    import torch

    from ..model import apply
    from ..recipe import Recipe

    reg = _registry()
    bb = reg.backbone(args.backbone)
    recipe = Recipe.parse(args.recipe, components=list(bb.components))
    ctx = torch.device("meta") if args.meta else torch.device("cpu")
    with ctx:
        model = bb.build()
    pm = apply(model, recipe, backbone=bb, registry=reg, keep_base=False)
    report = pm.trainable_report()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report)
    if args.modules:
        for k, p in pm.adapter_tensors().items():
            print(f"  {k}  {tuple(p.shape)}")
    return 0


@hookimpl
def register_commands(register):
    register(Command("methods", "list the registered fine-tuning methods", _methods_configure, _methods_run))
    register(Command("backbones", "list the registered backbones", lambda p: None, _backbones_run))
    register(Command("plugins", "list installed plugins with versions, hooks and status", _plugins_configure, _plugins_run))
    register(Command("recipe", "work with recipes ('peftmed recipe check RECIPE --backbone B')", _recipe_configure, _recipe_run))
