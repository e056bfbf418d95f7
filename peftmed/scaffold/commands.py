"""The ``peftmed plugin`` command (``plugin new``), registered like any other plugin command."""

from __future__ import annotations

import argparse

from ..cli import Command
from ..hookspecs import hookimpl
from . import KINDS, create_plugin, names_for


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="write a new plugin package from a template",
                         description="Write peftmed-plugin-NAME/ (pyproject.toml with the entry point, a module "
                                     "with the hook implementation, README, conformance tests). An existing "
                                     "folder is refused.")
    new.add_argument("name", help="plugin name, e.g. my-method (the distribution is peftmed-plugin-NAME)")
    new.add_argument("--kind", required=True, choices=KINDS, help="what the plugin adds")
    new.add_argument("--dir", default=".", help="folder to create the package in (default: here)")


def _run(args) -> int:
    root = create_plugin(args.name, args.kind, args.dir)
    n = names_for(args.name)
    print(f"wrote {root}/ ({args.kind} plugin {n['distribution']}, module {n['module']})")
    print("next:")
    print(f"  pip install --no-build-isolation --no-deps -e {root}")
    print(f"  pytest {root / 'tests'}")
    return 0


@hookimpl
def register_commands(register):
    register(Command("plugin", "create plugin packages ('peftmed plugin new NAME --kind method')", _configure, _run))
